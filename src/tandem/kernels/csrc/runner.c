/* A helper thread that runs one tandem_moe call at a time while its caller goes on.
 *
 * In a decode step shared with the GPU, the caller's thread first queues the GPU's part (about
 * half a millisecond of Python per MoE layer) and only then could it run the CPU's part: the
 * CPU's experts waited for the launch. Started on this thread before the launch, they run
 * during it. A Python thread cannot do this: the hand-over needs the GIL, which the launch holds.
 *
 * The helper is the master of its own OpenMP team (libgomp keeps a team per master thread, so
 * its workers persist between calls). Both sides spin for up to spin_ns (2 ms unless set) before
 * they sleep on a condition variable: decode calls come every ~0.5-2 ms, and a futex wake-up
 * costs tens of microseconds on a virtual machine. But a spinning side holds a core: with the
 * team on all the others, any other runnable thread takes a worker's, and the op's barriers wait
 * for it. (Timed, not counted: PAUSE takes ~10 cycles on some CPUs and ~140 on recent Intel ones.)
 *
 * A call may also be started before its inputs exist (tandem_runner_start_after): the GPU is
 * still computing the token's routing when the caller posts it, and the helper polls a readiness
 * function (the CUDA runtime's cudaEventQuery on an event recorded after that work) before it
 * runs. The GPU share's split of one token is fixed in advance by a count: the slots holding the
 * n_skip lowest expert ids are the GPU's, after those of experts the share holds in VRAM (a flag
 * per expert, known before the routing: its prefetch or cache). So the CPU's experts start as
 * soon as the routing is in host memory, not after the caller woke up, split in Python and
 * handed them over (~0.2 ms a MoE layer on the GPU machine).
 *
 * Such a call may also carry the GPU share's copies (share_copies): the GPU's experts' bytes from
 * the file mapping into the share's device slots, queued by this thread through the CUDA runtime
 * right after the routing is in and before the op, instead of ~0.2 ms later by the caller (its
 * wake-up and the Python before them). The caller waits for them to be queued
 * (tandem_runner_wait_copies) before it queues the kernels that read them. Measured in run C:
 * the GPU took more experts, the decode step no less time (gpu_share's TANDEM_SHARE_RUNNER_COPIES).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define PAUSE() _mm_pause()
#else
#define PAUSE() ((void)0)
#endif

int tandem_moe(const float *x, int n_tok, int d, const int32_t *ids, const float *w, int k,
               const void *gate, int gate_type, const void *up, int up_type, const void *down, int down_type,
               int n_expert, int n_ff, float *out, int n_threads);

static _Atomic long long spin_ns = 2000000; /* spin this long before sleeping: a decode step's gap */
#define RUNNER_BUSY -4 /* a call was started while the previous one had not been waited for */
#define REPEATED_EXPERT -5 /* a split in advance met one expert in two slots of a token */
#define NOT_READY_FAILED -6 /* the readiness function reported an error */
#define CANCELLED -7 /* the runner was freed while a call still waited for its inputs */
#define NO_COPIES -8 /* tandem_runner_wait_copies for a call that carried none */
#define TOO_MANY_SLOTS -9 /* share copies for more than MAX_K slots */
#define COPIES_WITH_RESIDENT -10 /* share copies asked for with experts held in VRAM (they copy the lowest ids) */
#define NOT_READY 600 /* cudaErrorNotReady: what the readiness function returns until the inputs are in */
#define SKIPPED_SLOT -1 /* experts.c: a slot computed elsewhere */
#define HOST_TO_DEVICE 1 /* cudaMemcpyHostToDevice */
#define MAX_K 64 /* a token's experts a call with share copies may have */

typedef int (*ready_fn)(void *);
typedef int (*copy_fn)(void *dst, const void *src, size_t n, int kind, void *stream); /* cudaMemcpyAsync */
typedef int (*record_fn)(void *event, void *stream); /* cudaEventRecord */
typedef int (*set_device_fn)(int device); /* cudaSetDevice */

/* The GPU share's copies for a call started in advance (gpu_share.GpuShare.runner_copies builds
 * it; the layout is native.ShareCopies'). Its n_skip lowest ids, ascending, in two halves as
 * the share splits one token's experts (the first ceil(n/2), then the rest); half h's expert i
 * goes to row i of each matrix's slots: matrix m of expert e lies at src[m] + e * size[m], its
 * slot row at dst[h][m] + i * size[m]. Runs of consecutive ids go as one copy; events[h] is
 * recorded on the stream after half h's copies. */
typedef struct {
    copy_fn copy;
    record_fn record;
    set_device_fn set_device;
    void *stream;
    void *events[2];
    const char *src[3];
    long long size[3];
    char *dst[2][3];
    int device;
} share_copies;

enum { IDLE, POSTED, DONE, QUIT };

typedef struct {
    const float *x;
    const int32_t *ids;
    const float *w;
    const void *gate, *up, *down;
    float *out;
    int n_tok, d, k, gate_type, up_type, down_type, n_expert, n_ff, n_threads;
    /* a call started before its inputs are in (tandem_runner_start_after); ready NULL otherwise */
    ready_fn ready;
    void *event;
    const int64_t *ids64; /* one token's k expert ids as the router wrote them */
    int32_t *ids32; /* where they go, the GPU's slots skipped: the op's ids */
    int n_skip;
    const share_copies *copies; /* the GPU share's copies to queue first, or NULL */
    const uint8_t *resident; /* per expert: nonzero where the share holds it in VRAM; or NULL */
} moe_args;

typedef struct {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    _Atomic int state;
    _Atomic int closing; /* set by tandem_runner_free: a wait for inputs gives up */
    moe_args args;
    _Atomic int copies_done; /* the share copies of the call posted last are queued (or failed) */
    int copies_rc; /* their result: 0, a CUDA error code, or one of the codes above */
    int rc;
    double seconds; /* how long the last call ran on the thread */
} runner;

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Wait until `r`'s state leaves `from`: spin, then sleep. Returns the new state. */
static int wait_while(runner *r, int from) {
    const long long until = now_ns() + atomic_load_explicit(&spin_ns, memory_order_relaxed);
    for (int i = 1;; i++) {
        const int s = atomic_load_explicit(&r->state, memory_order_acquire);
        if (s != from) return s;
        PAUSE();
        if (i % 64 == 0 && now_ns() > until) break;
    }
    pthread_mutex_lock(&r->lock);
    int s;
    while ((s = atomic_load_explicit(&r->state, memory_order_acquire)) == from) pthread_cond_wait(&r->changed, &r->lock);
    pthread_mutex_unlock(&r->lock);
    return s;
}

static void set_state(runner *r, int s) {
    pthread_mutex_lock(&r->lock);
    atomic_store_explicit(&r->state, s, memory_order_release);
    pthread_cond_broadcast(&r->changed);
    pthread_mutex_unlock(&r->lock);
}

/* Spin until ready(event) says the inputs are in: 0, NOT_READY_FAILED, or CANCELLED once the
 * runner is being freed (inputs that never come must not hang its owner's close). A query costs
 * about a microsecond and may take a lock of the driver that the caller's launches need: ask
 * every ~64 pauses, not at every one. */
static int wait_ready(runner *r, ready_fn ready, void *event) {
    for (;;) {
        const int rc = ready(event);
        if (rc == 0) return 0;
        if (rc != NOT_READY) return NOT_READY_FAILED;
        if (atomic_load_explicit(&r->closing, memory_order_relaxed)) return CANCELLED;
        for (int i = 0; i < 64; i++) PAUSE();
    }
}

/* One token's k ids into the op's, the GPU's slots marked SKIPPED_SLOT: those of `resident`
 * experts (NULL: none), then those of the n_skip lowest other ids (gpu_share.split's order).
 * 0, REPEATED_EXPERT when two slots hold one expert (a token's top-k never does; the GPU's part
 * takes whole experts), -3 for an id outside [0, n_expert). */
static int split_ids(const int64_t *ids, int32_t *out, int k, int n_skip, const uint8_t *resident, int n_expert) {
    for (int j = 0; j < k; j++)
        if (ids[j] < 0 || ids[j] >= n_expert) return -3;
    for (int j = 0; j < k; j++) {
        const int held = resident && resident[ids[j]];
        int below = 0; /* other ids below this one, resident ones not counted */
        for (int i = 0; i < k; i++) {
            if (i != j && ids[i] == ids[j]) return REPEATED_EXPERT;
            below += ids[i] < ids[j] && !(resident && resident[ids[i]]);
        }
        out[j] = held || below < n_skip ? SKIPPED_SLOT : (int32_t)ids[j];
    }
    return 0;
}

/* Queue the share copies `c` of the n lowest of a token's k distinct ids: 0 or the first
 * failing call's code. */
static int queue_copies(const share_copies *c, const int64_t *ids, int k, int n) {
    if (k > MAX_K) return TOO_MANY_SLOTS;
    int64_t e[MAX_K];
    for (int j = 0; j < k; j++) { /* insertion sort: k is 8 for R1 */
        int i = j;
        for (; i > 0 && e[i - 1] > ids[j]; i--) e[i] = e[i - 1];
        e[i] = ids[j];
    }
    int rc = c->set_device(c->device); /* this thread's current device: the stream's */
    const int cut = n > 1 ? (n + 1) / 2 : n;
    for (int h = 0; h < 2 && rc == 0; h++) {
        const int first = h ? cut : 0, last = h ? n : cut;
        if (first == last) break;
        for (int m = 0; m < 3 && rc == 0; m++)
            for (int i = first, j; i < last && rc == 0; i = j) {
                for (j = i + 1; j < last && e[j] == e[j - 1] + 1; j++) {
                }
                rc = c->copy(c->dst[h][m] + (i - first) * c->size[m], c->src[m] + e[i] * c->size[m],
                             (size_t)(j - i) * (size_t)c->size[m], HOST_TO_DEVICE, c->stream);
            }
        if (rc == 0) rc = c->record(c->events[h], c->stream);
    }
    return rc;
}

static void copies_finished(runner *r, int rc) {
    r->copies_rc = rc;
    atomic_store_explicit(&r->copies_done, 1, memory_order_release);
}

static void *serve(void *arg) {
    runner *r = arg;
    for (;;) {
        int s = atomic_load_explicit(&r->state, memory_order_acquire);
        while (s != POSTED && s != QUIT) s = wait_while(r, s);
        if (s == QUIT) return NULL;
        const moe_args *a = &r->args;
        if (a->ready) {
            r->rc = wait_ready(r, a->ready, a->event);
            if (r->rc == 0) r->rc = split_ids(a->ids64, a->ids32, a->k, a->n_skip, a->resident, a->n_expert);
            if (a->copies) /* the GPU's part starts first: its copies, then this op */
                copies_finished(r, r->rc != 0 ? r->rc : queue_copies(a->copies, a->ids64, a->k, a->n_skip));
            if (r->rc != 0) {
                r->seconds = 0.0;
                set_state(r, DONE);
                continue;
            }
        }
        struct timespec t0, t1; /* the op alone: a wait for the inputs is not its time */
        clock_gettime(CLOCK_MONOTONIC, &t0);
        r->rc = tandem_moe(a->x, a->n_tok, a->d, a->ids, a->w, a->k, a->gate, a->gate_type, a->up, a->up_type,
                           a->down, a->down_type, a->n_expert, a->n_ff, a->out, a->n_threads);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        r->seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        set_state(r, DONE);
    }
}

/* How long either side spins before it sleeps, in nanoseconds (0: sleep at once), for all runners. */
void tandem_runner_set_spin_ns(long long ns) { atomic_store(&spin_ns, ns < 0 ? 0 : ns); }

/* A new runner with its thread started, or NULL. */
void *tandem_runner_new(void) {
    runner *r = calloc(1, sizeof(runner));
    if (!r) return NULL;
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->changed, NULL);
    atomic_init(&r->state, IDLE);
    atomic_init(&r->closing, 0);
    atomic_init(&r->copies_done, 1);
    r->copies_rc = NO_COPIES;
    if (pthread_create(&r->thread, NULL, serve, r) != 0) {
        free(r);
        return NULL;
    }
    return r;
}

/* Start tandem_moe with these arguments (see there) on `r`'s thread and return at once: 0, or
 * RUNNER_BUSY when the last call has not been waited for. The buffers must stay valid until
 * tandem_runner_wait returns. */
int tandem_runner_start(void *handle, const float *x, int n_tok, int d, const int32_t *ids, const float *w, int k,
                        const void *gate, int gate_type, const void *up, int up_type, const void *down,
                        int down_type, int n_expert, int n_ff, float *out, int n_threads) {
    runner *r = handle;
    const int s = atomic_load_explicit(&r->state, memory_order_acquire);
    if (s == POSTED || s == DONE) return RUNNER_BUSY;
    r->args = (moe_args){x, ids, w, gate, up, down, out, n_tok, d, k, gate_type, up_type, down_type, n_expert, n_ff,
                         n_threads, NULL, NULL, NULL, NULL, 0, NULL, NULL};
    r->copies_rc = NO_COPIES;
    atomic_store(&r->copies_done, 1);
    set_state(r, POSTED);
    return 0;
}

/* tandem_runner_start for one token whose inputs are still being written (by the GPU): the
 * helper waits until ready(event) returns 0 (NOT_READY until then; anything else fails the
 * call), then writes ids64's k ids into ids32 with the GPU's slots marked SKIPPED_SLOT (those
 * of `resident` experts, NULL: none, then of the n_skip lowest other ids), queues `copies`
 * (NULL: none; only without `resident`) of the n_skip experts, and runs the op on x, ids32, w.
 * All buffers, and `copies`, must stay valid until tandem_runner_wait returns. */
int tandem_runner_start_after(void *handle, ready_fn ready, void *event, const int64_t *ids64, int n_skip,
                              const float *x, int d, int32_t *ids32, const float *w, int k, const void *gate,
                              int gate_type, const void *up, int up_type, const void *down, int down_type,
                              int n_expert, int n_ff, float *out, int n_threads, const share_copies *copies,
                              const uint8_t *resident) {
    runner *r = handle;
    if (copies && resident) return COPIES_WITH_RESIDENT;
    const int s = atomic_load_explicit(&r->state, memory_order_acquire);
    if (s == POSTED || s == DONE) return RUNNER_BUSY;
    r->args = (moe_args){x, ids32, w, gate, up, down, out, 1, d, k, gate_type, up_type, down_type, n_expert, n_ff,
                         n_threads, ready, event, ids64, ids32, n_skip, copies, resident};
    r->copies_rc = NO_COPIES;
    atomic_store(&r->copies_done, copies == NULL);
    set_state(r, POSTED);
    return 0;
}

/* Wait until the share copies of the call last started on `r` are queued: 0, the failing CUDA
 * call's code, the call's own failure code if it failed before them (its inputs' wait, its ids),
 * or NO_COPIES when it carried none. Spins: the caller asks once the inputs are in (it read the
 * routing), when the copies take microseconds. */
int tandem_runner_wait_copies(void *handle) {
    runner *r = handle;
    while (!atomic_load_explicit(&r->copies_done, memory_order_acquire)) PAUSE();
    return r->copies_rc;
}

/* Wait for the call last started on `r`: tandem_moe's return code (0 when none was started). */
int tandem_runner_wait(void *handle) {
    runner *r = handle;
    int s = atomic_load_explicit(&r->state, memory_order_acquire);
    if (s == IDLE) return 0;
    while (s == POSTED) s = wait_while(r, POSTED);
    const int rc = r->rc;
    set_state(r, IDLE);
    return rc;
}

/* Seconds the last call waited for ran on `r`'s thread (profiles). */
double tandem_runner_seconds(void *handle) { return ((runner *)handle)->seconds; }

/* Wait for any call under way, end the thread, free the runner. */
void tandem_runner_free(void *handle) {
    runner *r = handle;
    if (!r) return;
    atomic_store(&r->closing, 1);
    tandem_runner_wait(r);
    set_state(r, QUIT);
    pthread_join(r->thread, NULL);
    pthread_cond_destroy(&r->changed);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

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

enum { IDLE, POSTED, DONE, QUIT };

typedef struct {
    const float *x;
    const int32_t *ids;
    const float *w;
    const void *gate, *up, *down;
    float *out;
    int n_tok, d, k, gate_type, up_type, down_type, n_expert, n_ff, n_threads;
} moe_args;

typedef struct {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    _Atomic int state;
    moe_args args;
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

static void *serve(void *arg) {
    runner *r = arg;
    for (;;) {
        int s = atomic_load_explicit(&r->state, memory_order_acquire);
        while (s != POSTED && s != QUIT) s = wait_while(r, s);
        if (s == QUIT) return NULL;
        const moe_args *a = &r->args;
        struct timespec t0, t1;
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
                         n_threads};
    set_state(r, POSTED);
    return 0;
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
    tandem_runner_wait(r);
    set_state(r, QUIT);
    pthread_join(r->thread, NULL);
    pthread_cond_destroy(&r->changed);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

/* Which CPUs share a physical core, measured: tandem's IQ1_S tile kernel (one token, R1's
 * gate/up shape, 2048 rows of 7168) on CPU 0 alone, then with a second copy running on CPU j,
 * for every other j. Two hyperthreads of one core slow each other (~1.5-2x here: the kernel is
 * bound by its arithmetic and grid lookups); two cores do not. Inside a VM the topology it
 * reports (`threads_per_core`) may not say how the host placed the vCPUs.
 *
 *   gcc -O3 -fopenmp -std=gnu11 -ffp-contract=off -o /tmp/core_pairs \
 *       benchmarks/csrc/core_pairs.c -lm && /tmp/core_pairs
 */
#include "../../src/tandem/kernels/csrc/experts.c"

#include <sched.h>
#include <stdio.h>
#include <time.h>

enum { D = 7168, NFF = 2048, NB = D / QK, REPS = 5 };

static block_iq1_s *w;
static block_q8 *xq;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

/* best of REPS passes over the matrix on this thread, ms */
static double matrix_ms(void) {
    const block_q8 *xs[1] = {xq};
    float out[TILE];
    double best = 1e9;
    for (int rep = 0; rep < REPS; rep++) {
        const double a = now();
        for (int r = 0; r < NFF; r++) dot_for(&types[0])(w + (size_t)r * NB, xs, 1, NB, out);
        best = fmin(best, now() - a);
    }
    return best * 1e3;
}

int main(void) {
    static uint8_t grid1[2048 * 8], grid2[256 * 8];
    for (size_t i = 0; i < sizeof grid1; i++) grid1[i] = (uint8_t)(i * 7 % 3);
    for (size_t i = 0; i < sizeof grid2; i++) grid2[i] = (uint8_t)(i % 43);
    tandem_set_tables(grid1, grid2);
    w = aligned_alloc(64, sizeof(block_iq1_s) * (size_t)NFF * NB);
    for (size_t i = 0; i < sizeof(block_iq1_s) * (size_t)NFF * NB; i++) ((uint8_t *)w)[i] = (uint8_t)rand();
    for (size_t i = 0; i < (size_t)NFF * NB; i++) w[i].d = 0x3c00; /* 1.0 */
    float x[D];
    for (int i = 0; i < D; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
    xq = aligned_alloc(64, sizeof(block_q8) * NB);
    quantize_row(x, xq, D);
    const int n_cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    pin(0);
    const double alone = matrix_ms();
    printf("IQ1_S tile, one token, %d x %d, best of %d: CPU 0 alone %.3f ms\n", NFF, D, REPS, alone);
    for (int j = 1; j < n_cpus; j++) {
        double on0 = 0.0;
#pragma omp parallel num_threads(2)
        {
            pin(omp_get_thread_num() == 0 ? 0 : j);
#pragma omp barrier
            const double ms = matrix_ms();
            if (omp_get_thread_num() == 0) on0 = ms;
        }
        printf("with CPU %2d busy too: %.3f ms (x%.2f)\n", j, on0, on0 / alone);
    }
    return 0;
}

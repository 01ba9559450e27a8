/* Times the pieces of tandem's IQ1_S expert kernels on one thread, R1's gate/up shape (2048 rows
 * of 7168): the tile kernel for 1..8 tokens, decoding rows into scratch, and the AMX path for a
 * batch's pairs (decode + products) and its products alone on decoded rows. It includes
 * experts.c, so it sees the static functions. Weights are random bytes (scale 1.0): the kernels'
 * speed does not depend on the values.
 *
 *   gcc -O3 -fopenmp -std=gnu11 -ffp-contract=off -o /tmp/iq1_s_pieces \
 *       benchmarks/csrc/iq1_s_pieces.c -lm && /tmp/iq1_s_pieces
 */
#include "../../src/tandem/kernels/csrc/experts.c"

#include <stdio.h>
#include <time.h>

enum { D = 7168, NFF = 2048, NB = D / QK, NT = 16, REPS = 5 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(void) {
    static uint8_t grid1[2048 * 8], grid2[256 * 8];
    for (size_t i = 0; i < sizeof grid1; i++) grid1[i] = (uint8_t)(i * 7 % 3);
    for (size_t i = 0; i < sizeof grid2; i++) grid2[i] = (uint8_t)(i % 43);
    tandem_set_tables(grid1, grid2);
    block_iq1_s *w = aligned_alloc(64, sizeof(block_iq1_s) * (size_t)NFF * NB);
    for (size_t i = 0; i < sizeof(block_iq1_s) * (size_t)NFF * NB; i++) ((uint8_t *)w)[i] = (uint8_t)rand();
    for (size_t i = 0; i < (size_t)NFF * NB; i++) w[i].d = 0x3c00; /* 1.0 */
    float *x = malloc(sizeof(float) * D * NT);
    for (int i = 0; i < D * NT; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
    block_q8 *xq = aligned_alloc(64, sizeof(block_q8) * NB * NT);
    for (int t = 0; t < NT; t++) quantize_row(x + (size_t)t * D, xq + (size_t)t * NB, D);
    printf("AVX-512 kernels: %d, AMX: %d; ms per %d rows of %d, one thread, best of %d\n",
           types[0].fast != NULL, amx_ok, NFF, D, REPS);

    const block_q8 *xs[TILE];
    float out[TILE];
    for (int nt = 1; nt <= TILE; nt *= 2) {
        for (int t = 0; t < nt; t++) xs[t] = xq + (size_t)t * NB;
        double best = 1e9;
        for (int rep = 0; rep < REPS; rep++) {
            const double a = now();
            for (int r = 0; r < NFF; r++) dot_for(&types[0])(w + (size_t)r * NB, xs, nt, NB, out);
            best = fmin(best, now() - a);
        }
        printf("tile kernel, %d token(s): %.3f\n", nt, best * 1e3);
    }
#if X86
    if (!amx_ok) return 0;
    gemm_scratch g = {0};
    if (!gemm_scratch_alloc(&g, NB)) return 1;
    const size_t row_stride = (size_t)NB * QK;
    double best = 1e9;
    for (int rep = 0; rep < REPS; rep++) {
        const double a = now();
        for (int r = 0; r < NFF; r += AMX_ROWS)
            for (int i = 0; i < AMX_ROWS; i++)
                iq1_s_decode_row(w + (size_t)(r + i) * NB, NB, g.w + i * row_stride, g.corr + (size_t)i * 4 * NB,
                                 g.dw + (size_t)i * NB);
        best = fmin(best, now() - a);
    }
    printf("decoding rows into scratch: %.3f\n", best * 1e3);
    int pairs[NT];
    float *y = calloc((size_t)NT * NFF, sizeof(float));
    float res[AMX_ROWS * PANEL_V * 16];
    for (int t = 0; t < NT; t++) pairs[t] = t;
    for (int n_pairs = 4; n_pairs <= NT; n_pairs *= 2) {
        build_panel(xq, NB, pairs, n_pairs, 1, 0, g.panel);
        double whole = 1e9, products = 1e9;
        for (int rep = 0; rep < REPS; rep++) {
            double a = now();
            rows_gemm_amx(TYPE_IQ1_S, w, NB, 0, NFF, &g, pairs, n_pairs, y, NFF);
            whole = fmin(whole, now() - a);
            a = now();
            for (int r = 0; r < NFF; r += AMX_ROWS)
                iq1_s_amx_rows(g.w, g.corr, g.dw, row_stride, g.panel, NB, AMX_ROWS, (n_pairs + 15) / 16, res);
            products = fmin(products, now() - a);
        }
        printf("AMX path, %2d pairs: %.3f (its products and scaling on decoded rows alone: %.3f)\n", n_pairs,
               whole * 1e3, products * 1e3);
    }
    amx_done();
#endif
    return 0;
}

/* Routed experts on the CPU: tandem's own kernels for the low-bit types of DeepSeek-R1 GGUFs.
 *
 * ggml's IQ1_S / IQ2_XXS dot products are compute-bound (they assemble each 8-weight group from
 * a lookup table with scalar inserts and read ~16% of the RAM bandwidth on 16 cores). Here the
 * groups are gathered by vector loads, the per-32 scale is folded into the weight bytes where it
 * fits (IQ1_S), and every decoded weight vector serves all the tokens that picked its expert.
 *
 * Numerics (as ggml's CPU path): activations are quantized per 256 values to int8 with one
 * float scale (ggml's Q8_K), integer dot products per block, float accumulation across blocks.
 *
 * One call = one MoE layer: quantize x, group (token, slot) pairs by expert, gate and up rows
 * with SiLU-gating, quantize the hidden rows, down rows, weighted sum over the k slots. Threads:
 * OpenMP, one parallel region per call, work split by (expert, row range, block of pairs).
 * Experts with many pairs (prefill) run as GEMMs with the tokens in the lanes (AVX-512), or for
 * IQ1_S and IQ2_XXS on AMX tiles where the CPU has them.
 *
 * Formats (ggml-common.h): block_iq1_s {f16 d; u8 qs[32]; u16 qh[8]}  w = d*(2s+1)*(g+delta)
 * with g in {-1,0,1} from a 2048-entry grid, s = qh>>12 & 7, delta = qh>>15 ? -1/8 : 1/8;
 * block_iq2_xxs {f16 d; u16 qs[32]}: per 32 weights 4 grid bytes (256-entry grid of
 * 8/25/43), 4x7 sign bits (the 8th is their parity) and a 4-bit scale s: w = d*(2s+1)/8*g*sign.
 * Q4_K / Q6_K (llama.cpp's Q4_K_M experts): block_q4_k {f16 d, dmin; u8 scales[12]; u8 qs[128]}
 * w = d*sc*q - dmin*m per 32 weights (6-bit sc, m packed in 12 bytes); block_q6_k {u8 ql[128];
 * u8 qh[64]; i8 scales[16]; f16 d} w = d*sc*(q - 32) per 16 weights, q = 4 low + 2 high bits.
 */
#define _GNU_SOURCE /* syscall() */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif

#define QK 256
#define TILE 8 /* tokens sharing one decoded weight row at a time */
#define SKIPPED_SLOT -1 /* expert id of a (token, slot) pair this call leaves out */

enum { TYPE_Q4_K = 12, TYPE_Q6_K = 14, TYPE_IQ2_XXS = 16, TYPE_IQ1_S = 19 };

typedef struct {
    uint16_t d;
    uint8_t qs[32];
    uint16_t qh[8];
} block_iq1_s;

typedef struct {
    uint16_t d;
    uint16_t qs[32];
} block_iq2_xxs;

typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[128];
} block_q4_k;

typedef struct {
    uint8_t ql[128];
    uint8_t qh[64];
    int8_t scales[16];
    uint16_t d;
} block_q6_k;

/* Activations of one 256-value block: x ~ d * q; s32[i] = sum of q over values 32i..32i+31,
 * s16[i] over 16i..16i+15. */
typedef struct {
    float d;
    int8_t q[QK];
    int16_t s32[8];
    int16_t s16[16];
} block_q8;

/* Grids as set by tandem_set_tables: IQ1_S with g+1 (0,1,2) per byte, IQ2_XXS as stored. */
static uint64_t iq1s_grid[2048];
static uint64_t iq2xxs_grid[256];
static uint8_t iq2_signs[128];
static int tables_set = 0;

/* Denormal floats take microcode assists on x86 (~100 cycles per operation on Intel); on the
 * GPU machine the kernel calls ran 5x slower on the overflowing activations of a badly scaled
 * synthetic model, denormals the likely cause. Every thread of a call flushes them to zero
 * (FTZ + DAZ), as GPUs do by default. */
#if defined(__x86_64__)
#include <xmmintrin.h>
#define FLUSH_DENORMALS_BEGIN const unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define FLUSH_DENORMALS_END _mm_setcsr(saved_csr);
#else
#define FLUSH_DENORMALS_BEGIN
#define FLUSH_DENORMALS_END
#endif

/* ---------------------------------------------------------------------------------------- */

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void quantize_row_q8(const float *x, block_q8 *y, int n) {
    for (int b = 0; b < n / QK; b++, x += QK) {
        float amax = 0.f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[i]));
        float id = amax > 0.f ? 127.f / amax : 0.f;
        y[b].d = amax > 0.f ? amax / 127.f : 0.f;
        for (int i = 0; i < 16; i++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) {
                int q = (int)lrintf(x[16 * i + j] * id);
                y[b].q[16 * i + j] = (int8_t)q;
                sum += q;
            }
            y[b].s16[i] = (int16_t)sum;
        }
        for (int i = 0; i < 8; i++) y[b].s32[i] = (int16_t)(y[b].s16[2 * i] + y[b].s16[2 * i + 1]);
    }
}

/* e^x in plain multiplies and adds: Cephes' expf polynomial after a Cody-Waite reduction, x
 * clamped to [-87, 88] (2^n stays a normal float). exp_avx512 does the same operations in the
 * same order, so every path of the MoE computes the same hidden values. Within ~2 ulp of expf. */
static float exp_portable(float x) {
    x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;
    const float n = (x * 1.44269504f + 12582912.f) - 12582912.f; /* rounded to an integer */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * (r * r) + r + 1.f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return e * two_n;
}

/* The experts' hidden values: g = silu(g) * u over n values. */
static void silu_mul_portable(float *g, const float *u, int n) {
    for (int i = 0; i < n; i++) g[i] = g[i] / (1.f + exp_portable(-g[i])) * u[i];
}

/* ---- portable dot products: row of nb blocks times nt activation rows --------------------- */

static void dot_iq1_s_ref(const void *row, const block_q8 *const *x, int nt, int nb, float *out) {
    const block_iq1_s *b = row;
    for (int t = 0; t < nt; t++) out[t] = 0.f;
    for (int ib = 0; ib < nb; ib++) {
        const float dw = f16_to_f32(b[ib].d);
        for (int t = 0; t < nt; t++) {
            const block_q8 *xb = x[t] + ib;
            int total = 0; /* sum over sub-blocks of ls * (8*sum(u*q) - m*sum(q)), see header */
            for (int s = 0; s < 8; s++) {
                const uint16_t h = b[ib].qh[s];
                const int ls = 2 * ((h >> 12) & 7) + 1, m = (h & 0x8000) ? 9 : 7;
                int dot = 0;
                for (int l = 0; l < 4; l++) {
                    const uint8_t *u = (const uint8_t *)&iq1s_grid[b[ib].qs[4 * s + l] | (((h >> (3 * l)) & 7) << 8)];
                    for (int j = 0; j < 8; j++) dot += u[j] * xb->q[32 * s + 8 * l + j];
                }
                total += ls * (8 * dot - m * xb->s32[s]);
            }
            out[t] += dw * xb->d * (float)total;
        }
    }
    for (int t = 0; t < nt; t++) out[t] *= 0.125f;
}

static void dot_iq2_xxs_ref(const void *row, const block_q8 *const *x, int nt, int nb, float *out) {
    const block_iq2_xxs *b = row;
    for (int t = 0; t < nt; t++) out[t] = 0.f;
    for (int ib = 0; ib < nb; ib++) {
        const float dw = f16_to_f32(b[ib].d);
        for (int t = 0; t < nt; t++) {
            const block_q8 *xb = x[t] + ib;
            int total = 0;
            for (int s = 0; s < 8; s++) {
                uint32_t aux[2];
                memcpy(aux, b[ib].qs + 4 * s, 8);
                const int ls = 2 * (aux[1] >> 28) + 1;
                int dot = 0;
                for (int l = 0; l < 4; l++) {
                    const uint8_t *g = (const uint8_t *)&iq2xxs_grid[(aux[0] >> (8 * l)) & 255];
                    const uint8_t signs = iq2_signs[(aux[1] >> (7 * l)) & 127];
                    for (int j = 0; j < 8; j++) {
                        const int q = xb->q[32 * s + 8 * l + j];
                        dot += (signs >> j & 1) ? -g[j] * q : g[j] * q;
                    }
                }
                total += ls * dot;
            }
            out[t] += dw * xb->d * (float)total;
        }
    }
    for (int t = 0; t < nt; t++) out[t] *= 0.125f;
}

/* Q4_K's eight 6-bit scales and mins from their 12 packed bytes (ggml's get_scale_min_k4). */
static void q4_k_scales(const uint8_t *s, uint8_t *sc, uint8_t *m) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

static void dot_q4_k_ref(const void *row, const block_q8 *const *x, int nt, int nb, float *out) {
    const block_q4_k *b = row;
    for (int t = 0; t < nt; t++) out[t] = 0.f;
    for (int ib = 0; ib < nb; ib++) {
        uint8_t sc[8], m[8];
        q4_k_scales(b[ib].scales, sc, m);
        const float d = f16_to_f32(b[ib].d), dmin = f16_to_f32(b[ib].dmin);
        for (int t = 0; t < nt; t++) {
            const block_q8 *xb = x[t] + ib;
            int sumi = 0, summ = 0;
            for (int c = 0; c < 4; c++) { /* 32 bytes: low nibbles sub-block 2c, high 2c+1 */
                int lo = 0, hi = 0;
                for (int l = 0; l < 32; l++) {
                    lo += (b[ib].qs[32 * c + l] & 15) * xb->q[64 * c + l];
                    hi += (b[ib].qs[32 * c + l] >> 4) * xb->q[64 * c + 32 + l];
                }
                sumi += sc[2 * c] * lo + sc[2 * c + 1] * hi;
            }
            for (int j = 0; j < 8; j++) summ += m[j] * xb->s32[j];
            out[t] += xb->d * (d * (float)sumi - dmin * (float)summ);
        }
    }
}

static void dot_q6_k_ref(const void *row, const block_q8 *const *x, int nt, int nb, float *out) {
    const block_q6_k *b = row;
    for (int t = 0; t < nt; t++) out[t] = 0.f;
    for (int ib = 0; ib < nb; ib++) {
        uint8_t u[QK]; /* q + 32, 0..63, in value order */
        for (int n = 0; n < 2; n++) {
            const uint8_t *ql = b[ib].ql + 64 * n, *qh = b[ib].qh + 32 * n;
            for (int l = 0; l < 32; l++) {
                u[128 * n + l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
                u[128 * n + l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
                u[128 * n + l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                u[128 * n + l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        const float d = f16_to_f32(b[ib].d);
        for (int t = 0; t < nt; t++) {
            const block_q8 *xb = x[t] + ib;
            int sumi = 0;
            for (int g = 0; g < 16; g++) {
                int dot = 0;
                for (int j = 0; j < 16; j++) dot += u[16 * g + j] * xb->q[16 * g + j];
                sumi += b[ib].scales[g] * (dot - 32 * xb->s16[g]);
            }
            out[t] += xb->d * d * (float)sumi;
        }
    }
}

/* ---- AVX-512 (VNNI, VBMI, BITALG, VPOPCNTDQ, and BMI2: Ice Lake, Sapphire Rapids, Zen 4 and later) ---- */
#if X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bitalg,avx512vpopcntdq,f16c,bmi2")))
#define INLINE static inline __attribute__((always_inline))

/* exp_portable, 16 at a time. */
AVX512 INLINE __m512 exp_avx512(__m512 x) {
    const __m512 round = _mm512_set1_ps(12582912.f);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), round), round);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    const __m512 e = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), _mm512_set1_ps(1.f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(e, _mm512_castsi512_ps(bits));
}

/* silu_mul_portable, 16 at a time (n: a multiple of 16). */
AVX512 static void silu_mul_avx512(float *g, const float *u, int n) {
    for (int i = 0; i < n; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)), _mm512_loadu_ps(u + i)));
    }
}

/* quantize_row_q8, 16 values at a time: the same maximum, scale and rounding (the current mode,
 * as lrintf), so the same bytes. */
AVX512 static void quantize_row_q8_avx512(const float *x, block_q8 *y, int n) {
    for (int b = 0; b < n / QK; b++, x += QK) {
        __m512 v[16], amax = _mm512_setzero_ps();
        for (int i = 0; i < 16; i++) {
            v[i] = _mm512_loadu_ps(x + 16 * i);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
        }
        const float m = _mm512_reduce_max_ps(amax);
        const __m512 id = _mm512_set1_ps(m > 0.f ? 127.f / m : 0.f);
        y[b].d = m > 0.f ? m / 127.f : 0.f;
        for (int i = 0; i < 16; i++) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], id));
            _mm_storeu_si128((__m128i *)(y[b].q + 16 * i), _mm512_cvtsepi32_epi8(q));
            y[b].s16[i] = (int16_t)_mm512_reduce_add_epi32(q);
        }
        for (int i = 0; i < 8; i++) y[b].s32[i] = (int16_t)(y[b].s16[2 * i] + y[b].s16[2 * i + 1]);
    }
}

/* At decode a layer's experts come from RAM, not from a cache: each tile kernel asks for the
 * lines PREFETCH_AHEAD bytes past the block it decodes (past a row's end: the next row of the
 * matrix), on top of the hardware's prefetch. Run D on the GPU machine (kernel_ab --types layer,
 * 8 of 38 UD-IQ1_S experts, 15 threads): 2.03 -> 1.92 ms for one token, -5% to -9% for 1-8;
 * one matrix from L3 unchanged. */
#define PREFETCH_AHEAD 1024

INLINE void prefetch_ahead(const void *block, size_t bytes) {
    const char *p = (const char *)block + PREFETCH_AHEAD;
    for (size_t at = 0; at < bytes; at += 64) _mm_prefetch(p + at, _MM_HINT_T0);
    _mm_prefetch(p + bytes - 1, _MM_HINT_T0);
}

/* vpshufb tables for two sub-blocks of IQ1_S at once, by (s of the first) + 8 * (s of the
 * second): bytes 0..31 map g+1 to (g+1)*8*(2s+1) for the first, bytes 32..63 for the second. */
static uint8_t iq1s_scale_lut[64][64];

/* -(2s+1)*m of a sub-block by its top 4 qh bits k = s + 8*(delta < 0): m = 7 + 2*(k >> 3). */
static const int16_t iq1s_neg_lsm[16] = {-7, -21, -35, -49, -63, -77, -91, -105,
                                         -9, -27, -45, -63, -81, -99, -117, -135};

/* One IQ1_S block as 4 vectors of 64 weight bytes (g+1)*8*(2s+1) and -(2s+1)*m per sub-block
 * (int16, for the correction with the activations' 32-sums). Vector c holds groups 8c..8c+7:
 * their 11-bit indices are built in the 64-bit lanes of the gather (qs byte | 3 qh bits rotated
 * to bits 8..10), so no shuffles between the loads and the gathers. */
AVX512 INLINE void iq1_s_block(const block_iq1_s *blk, __m512i w[4], __m128i *neg_lsm) {
    /* lane j of vector c: its qh word (2c + j/4, as the low or high half of the broadcast
     * dword) rotated so that bits 3*(j%4) .. +2 land on 8..10 */
    const __m512i rotate = _mm512_set_epi64(47, 50, 53, 56, 63, 2, 5, 8);
    const __m512i high_bits = _mm512_set1_epi64(7 << 8);
    uint64_t qh_lo, qh_hi;
    memcpy(&qh_lo, blk->qh, 8);
    memcpy(&qh_hi, blk->qh + 4, 8);
    /* the scales s of sub-blocks 2c, 2c+1 at bits 6c..6c+5: the row of iq1s_scale_lut */
    const uint64_t scale_pairs = _pext_u64(qh_lo, 0x7000700070007000ULL) | (_pext_u64(qh_hi, 0x7000700070007000ULL) << 12);
    for (int c = 0; c < 4; c++) {
        uint32_t qh_pair;
        memcpy(&qh_pair, blk->qh + 2 * c, 4);
        const __m512i lo = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i *)(blk->qs + 8 * c)));
        const __m512i hi = _mm512_rolv_epi64(_mm512_set1_epi32((int)qh_pair), rotate);
        const __m512i idx = _mm512_ternarylogic_epi64(hi, high_bits, lo, 0xEA); /* hi & high_bits | lo */
        const __m512i u = _mm512_i64gather_epi64(idx, (const long long *)iq1s_grid, 8);
        w[c] = _mm512_shuffle_epi8(_mm512_loadu_si512(iq1s_scale_lut[(scale_pairs >> (6 * c)) & 63]), u);
    }
    const __m128i k = _mm_srli_epi16(_mm_loadu_si128((const __m128i *)blk->qh), 12);
    *neg_lsm = _mm256_castsi256_si128(
        _mm256_permutexvar_epi16(_mm256_castsi128_si256(k), _mm256_loadu_si256((const __m256i *)iq1s_neg_lsm)));
}

AVX512 INLINE void iq1_s_tile(const block_iq1_s *b, const block_q8 *const *x, const int nt, int nb, float *out) {
    __m512 accf[TILE];
    for (int t = 0; t < nt; t++) accf[t] = _mm512_setzero_ps();
    for (int ib = 0; ib < nb; ib++) {
        const block_iq1_s *blk = b + ib;
        prefetch_ahead(blk, sizeof *blk);
        __m512i w[4];
        __m128i neg_lsm;
        iq1_s_block(blk, w, &neg_lsm);
        __m512i acc[TILE];
        for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++)
            for (int t = 0; t < nt; t++) acc[t] = _mm512_dpbusd_epi32(acc[t], w[c], _mm512_loadu_si512(x[t][ib].q + 64 * c));
        const float dw = _cvtsh_ss(blk->d);
        for (int t = 0; t < nt; t++) {
            const __m128i corr = _mm_madd_epi16(neg_lsm, _mm_loadu_si128((const __m128i *)x[t][ib].s32));
            const __m512i total = _mm512_add_epi32(acc[t], _mm512_zextsi128_si512(corr));
            accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(dw * x[t][ib].d), accf[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = 0.125f * _mm512_reduce_add_ps(accf[t]);
}

/* One IQ2_XXS block: per 64 weights the grid bytes g (8/25/43) and the mask of negative ones,
 * and 2s+1 of sub-block i in dword 2i+1 of `ls`. */
AVX512 INLINE void iq2_xxs_block(const block_iq2_xxs *blk, __m512i g[4], __mmask64 neg[4], __m512i *ls) {
    /* bytes 0..3 of each sub-block's qword: its four 7-bit sign fields (bits 32, 39, 46, 53) */
    const __m512i sign_fields = _mm512_set1_epi64(0x352e2720LL);
    /* selector: bit j of sign byte g%4 in the qword that holds group g's signs */
    const __m512i sign_bits = _mm512_set_epi64(0x1f1e1d1c1b1a1918LL, 0x1716151413121110LL, 0x0f0e0d0c0b0a0908LL, 0x0706050403020100LL,
                                               0x1f1e1d1c1b1a1918LL, 0x1716151413121110LL, 0x0f0e0d0c0b0a0908LL, 0x0706050403020100LL);
    const __m512i group_byte = _mm512_set_epi64(11, 10, 9, 8, 3, 2, 1, 0); /* grid byte of group g */
    const __m512i all = _mm512_loadu_si512(blk->qs); /* 8 x (u32 grid bytes, u32 signs|scale) */
    *ls = _mm512_add_epi32(_mm512_slli_epi32(_mm512_srli_epi32(all, 28), 1), _mm512_set1_epi32(1));
    /* sign bytes with their parity bit on top, as ggml's ksigns_iq2xs */
    const __m512i s7 = _mm512_and_si512(_mm512_multishift_epi64_epi8(sign_fields, all), _mm512_set1_epi8(0x7f));
    const __m512i signs = _mm512_ternarylogic_epi64(s7, _mm512_slli_epi16(_mm512_popcnt_epi8(s7), 7), _mm512_set1_epi8((char)0x80), 0xF8);
    for (int c = 0; c < 4; c++) {
        const __m512i idx = _mm512_maskz_permutexvar_epi8(0x0101010101010101ULL, _mm512_add_epi64(group_byte, _mm512_set1_epi64(16 * c)), all);
        g[c] = _mm512_i64gather_epi64(idx, (const long long *)iq2xxs_grid, 8);
        const __m512i pair = _mm512_permutexvar_epi64(_mm512_set_epi64(2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c, 2 * c, 2 * c, 2 * c), signs);
        neg[c] = _mm512_bitshuffle_epi64_mask(pair, sign_bits);
    }
}

AVX512 INLINE void iq2_xxs_tile(const block_iq2_xxs *b, const block_q8 *const *x, const int nt, int nb, float *out) {
    __m512 accf[TILE];
    for (int t = 0; t < nt; t++) accf[t] = _mm512_setzero_ps();
    for (int ib = 0; ib < nb; ib++) {
        const block_iq2_xxs *blk = b + ib;
        prefetch_ahead(blk, sizeof *blk);
        __m512i g[4], ls;
        __mmask64 neg[4];
        iq2_xxs_block(blk, g, neg, &ls);
        __m512i acc[TILE];
        for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            /* scale of sub-block 2c in words 0..15, of 2c+1 in words 16..31 */
            const __m512i lsv = _mm512_permutexvar_epi16(
                _mm512_inserti64x4(_mm512_set1_epi16(8 * c + 2), _mm256_set1_epi16(8 * c + 6), 1), ls);
            for (int t = 0; t < nt; t++) {
                const __m512i q = _mm512_loadu_si512(x[t][ib].q + 64 * c);
                const __m512i qs = _mm512_mask_sub_epi8(q, neg[c], _mm512_setzero_si512(), q);
                acc[t] = _mm512_dpwssd_epi32(acc[t], _mm512_maddubs_epi16(g[c], qs), lsv);
            }
        }
        const float dw = _cvtsh_ss(blk->d);
        for (int t = 0; t < nt; t++)
            accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_set1_ps(dw * x[t][ib].d), accf[t]);
    }
    for (int t = 0; t < nt; t++) out[t] = 0.125f * _mm512_reduce_add_ps(accf[t]);
}

/* Q4_K: per 32 weight bytes, the 64 nibbles in value order; maddubs with the activations, then
 * dpwssd with the sub-block scales; the mins against the activations' 32-sums once per block. */
AVX512 INLINE void q4_k_tile(const block_q4_k *b, const block_q8 *const *x, const int nt, int nb, float *out) {
    __m512 accf[TILE];
    for (int t = 0; t < nt; t++) accf[t] = _mm512_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m512i scale_of_word[4]; /* words 0..15: sub-block 2c, 16..31: 2c+1 */
    for (int c = 0; c < 4; c++)
        scale_of_word[c] = _mm512_inserti64x4(_mm512_set1_epi16(2 * c), _mm256_set1_epi16(2 * c + 1), 1);
    for (int ib = 0; ib < nb; ib++) {
        const block_q4_k *blk = b + ib;
        prefetch_ahead(blk, sizeof *blk);
        /* the 6-bit scales to bytes 0..7, the mins to 8..15 (ggml's word trick) */
        uint32_t s[4];
        memcpy(s, blk->scales, 12);
        s[3] = ((s[2] >> 4) & 0x0f0f0f0f) | (((s[1] >> 6) & 0x03030303) << 4);
        const uint32_t mins_low = s[1] & 0x3f3f3f3f;
        s[1] = (s[2] & 0x0f0f0f0f) | (((s[0] >> 6) & 0x03030303) << 4);
        s[2] = mins_low;
        s[0] &= 0x3f3f3f3f;
        const __m128i bytes = _mm_loadu_si128((const __m128i *)s);
        const __m512i scales = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(bytes)); /* words 0..7 sc, 8..15 m */
        const __m128i mins = _mm_cvtepu8_epi16(_mm_srli_si128(bytes, 8));
        __m512i acc[TILE];
        for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * c));
            const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low4)),
                                                 _mm256_and_si256(_mm256_srli_epi16(v, 4), low4), 1);
            const __m512i scv = _mm512_permutexvar_epi16(scale_of_word[c], scales);
            for (int t = 0; t < nt; t++)
                acc[t] = _mm512_dpwssd_epi32(acc[t], _mm512_maddubs_epi16(u, _mm512_loadu_si512(x[t][ib].q + 64 * c)), scv);
        }
        const float d = _cvtsh_ss(blk->d), dmin = _cvtsh_ss(blk->dmin);
        for (int t = 0; t < nt; t++) {
            const __m128i summ = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)x[t][ib].s32));
            accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_set1_ps(d * x[t][ib].d), accf[t]);
            accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_zextsi128_si512(summ)), _mm512_set1_ps(-dmin * x[t][ib].d), accf[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = _mm512_reduce_add_ps(accf[t]);
}

/* Q6_K: 64 values at a time as q + 32 (0..63, unsigned for maddubs), the 16-value scales by
 * dpwssd; the -32 offset against the activations' 16-sums once per block. */
AVX512 INLINE void q6_k_tile(const block_q6_k *b, const block_q8 *const *x, const int nt, int nb, float *out) {
    __m512 accf[TILE];
    for (int t = 0; t < nt; t++) accf[t] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(3);
    const __mmask64 upper = 0xFFFFFFFF00000000ULL;
    /* word w of 64 values starting at group g0 belongs to group g0 + w/8 */
    __m512i group_of_word[4];
    for (int h = 0; h < 4; h++) {
        int16_t idx[32];
        for (int w = 0; w < 32; w++) idx[w] = (int16_t)(4 * h + w / 8);
        group_of_word[h] = _mm512_loadu_si512(idx);
    }
    for (int ib = 0; ib < nb; ib++) {
        const block_q6_k *blk = b + ib;
        prefetch_ahead(blk, sizeof *blk);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)blk->scales));
        const __m512i scales = _mm512_castsi256_si512(sc16);
        __m512i acc[TILE];
        for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_si512();
        for (int n = 0; n < 2; n++) {
            const __m512i ql = _mm512_loadu_si512(blk->ql + 64 * n);
            const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk->qh + 32 * n)));
            const __m512i h01 = _mm512_mask_blend_epi8(upper, qh, _mm512_srli_epi16(qh, 2));
            const __m512i h23 = _mm512_mask_blend_epi8(upper, _mm512_srli_epi16(qh, 4), _mm512_srli_epi16(qh, 6));
            const __m512i u0 = _mm512_or_si512(_mm512_and_si512(ql, low4), _mm512_slli_epi16(_mm512_and_si512(h01, two), 4));
            const __m512i u1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
                                               _mm512_slli_epi16(_mm512_and_si512(h23, two), 4));
            const __m512i sc0 = _mm512_permutexvar_epi16(group_of_word[2 * n], scales);
            const __m512i sc1 = _mm512_permutexvar_epi16(group_of_word[2 * n + 1], scales);
            for (int t = 0; t < nt; t++) {
                acc[t] = _mm512_dpwssd_epi32(acc[t], _mm512_maddubs_epi16(u0, _mm512_loadu_si512(x[t][ib].q + 128 * n)), sc0);
                acc[t] = _mm512_dpwssd_epi32(acc[t], _mm512_maddubs_epi16(u1, _mm512_loadu_si512(x[t][ib].q + 128 * n + 64)), sc1);
            }
        }
        const float d = _cvtsh_ss(blk->d);
        for (int t = 0; t < nt; t++) {
            const __m256i offset = _mm256_slli_epi32(_mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)x[t][ib].s16)), 5);
            const __m512i total = _mm512_sub_epi32(acc[t], _mm512_zextsi256_si512(offset));
            accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(d * x[t][ib].d), accf[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = _mm512_reduce_add_ps(accf[t]);
}

/* ---- Many tokens per expert (prefill): GEMMs with the tokens in the vector lanes ----
 * A task's activations are laid out once as a panel: per block and 4-value group, one vector of
 * 16 tokens x 4 bytes. Each weight row is decoded once into bytes; then every 4 weights of a row
 * are one broadcast and one vpdpbusd per 16 tokens. IQ1_S folds its scales into the bytes (as
 * above) and corrects with one vpdpwssd per 2 sub-blocks; IQ2_XXS and Q4_K sum per sub-block
 * and multiply by its scale. Same integer sums as the tile kernels. */
#define PANEL_V 8 /* token vectors per panel: TOKEN_BLOCK / 16 */
#define REG_V 4 /* token vectors whose sums one register block holds */
#define GEMM_MIN_PAIRS 16 /* fewer pairs per task: the tile kernels (tandem_set_gemm_min_pairs) */
#define AMX_GEMM_MIN_PAIRS 7 /* ... on AMX tiles, which pay off sooner (see min_pairs) */
#define GEMM_ROWS 4 /* weight rows per register block */

typedef struct {
    __m512i q[QK / 4][PANEL_V]; /* per 4-value group: 16 tokens x 4 bytes */
    __m512i s32[4][PANEL_V];    /* per pair of sub-blocks: 16 tokens x (s32[2p], s32[2p+1]) */
    __m512 d[PANEL_V];          /* 16 tokens' activation scales */
} panel_block;

/* The panel of up to TOKEN_BLOCK pairs (rows pairs[i] / x_div of xq), nb blocks; lanes past n_pairs 0.
 * `to_unsigned`: the activation bytes as q + 128 (for weights that are the signed operand). */
AVX512 static void build_panel(const block_q8 *xq, int nb, const int *pairs, int n_pairs, int x_div,
                               int to_unsigned, panel_block *panel) {
    const __m512i flip = _mm512_set1_epi8(to_unsigned ? (char)0x80 : 0);
    for (int v = 0; v < (n_pairs + 15) / 16; v++) { /* the GEMMs read no vector past n_pairs */
        int32_t offs[16];
        __mmask16 live = 0;
        for (int i = 0; i < 16; i++) {
            const int p = 16 * v + i;
            offs[i] = p < n_pairs ? (int32_t)((size_t)(pairs[p] / x_div) * nb * sizeof(block_q8)) : 0;
            if (p < n_pairs) live |= (__mmask16)(1u << i);
        }
        const __m512i base = _mm512_loadu_si512(offs);
        for (int ib = 0; ib < nb; ib++) {
            const __m512i blk = _mm512_add_epi32(base, _mm512_set1_epi32((int)(ib * sizeof(block_q8))));
            const char *x0 = (const char *)xq;
            for (int j = 0; j < QK / 4; j++)
                panel[ib].q[j][v] = _mm512_xor_si512(flip, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live,
                    _mm512_add_epi32(blk, _mm512_set1_epi32((int)offsetof(block_q8, q) + 4 * j)), x0, 1));
            for (int pr = 0; pr < 4; pr++)
                panel[ib].s32[pr][v] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live,
                    _mm512_add_epi32(blk, _mm512_set1_epi32((int)offsetof(block_q8, s32) + 4 * pr)), x0, 1);
            panel[ib].d[v] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live,
                _mm512_add_epi32(blk, _mm512_set1_epi32((int)offsetof(block_q8, d))), x0, 1);
        }
    }
}

/* One IQ1_S row as bytes (g+1)*8*(2s+1) per weight, -(2s+1)*m per sub-block as int16 pairs, and
 * the block scales: what iq1_s_tile computes per block, stored. */
AVX512 static void iq1_s_decode_row(const block_iq1_s *b, int nb, uint8_t *w, int32_t *corr, float *dw) {
    for (int ib = 0; ib < nb; ib++) {
        __m512i bytes[4];
        __m128i neg_lsm;
        iq1_s_block(b + ib, bytes, &neg_lsm);
        for (int c = 0; c < 4; c++) _mm512_storeu_si512(w + (size_t)ib * QK + 64 * c, bytes[c]);
        _mm_storeu_si128((__m128i *)(corr + 4 * ib), neg_lsm);
        dw[ib] = _cvtsh_ss(b[ib].d);
    }
}

/* out (16 tokens' float sums) += total * scale * d: one block's integer sums, scaled. */
AVX512 INLINE void accumulate(float *out, __m512i total, __m512 scale, __m512 d) {
    _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(scale, d), _mm512_loadu_ps(out)));
}

/* res (row r, token vector v at [r][v][16]) of token vectors v0 .. v0 + V - 1 set to 0. */
static void zero_results(float *res, int rows, int v0, int V) {
    for (int r = 0; r < rows; r++) memset(res + (size_t)(r * PANEL_V + v0) * 16, 0, sizeof(float) * 16 * V);
}

/* `rows` (1..GEMM_ROWS) decoded weight rows against the panel's V token vectors; the float sums
 * live in res (memory: it spares registers for integer accumulators, touched once a block). */
AVX512 INLINE void iq1_s_gemm_rows(const uint8_t *w, const int32_t *corr, const float *dw, size_t row_stride,
                                   const panel_block *panel, int nb, int v0, const int rows, const int V, float *res) {
    zero_results(res, rows, v0, V);
    for (int ib = 0; ib < nb; ib++) {
        __m512i acc[GEMM_ROWS][REG_V];
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_si512();
        const int32_t *w32 = (const int32_t *)(w + (size_t)ib * QK);
        for (int j = 0; j < QK / 4; j++) {
            __m512i wb[GEMM_ROWS];
            for (int r = 0; r < rows; r++) wb[r] = _mm512_set1_epi32(w32[r * row_stride / 4 + j]);
            for (int v = 0; v < V; v++) {
                const __m512i xv = panel[ib].q[j][v0 + v];
                for (int r = 0; r < rows; r++) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], wb[r], xv);
            }
        }
        for (int r = 0; r < rows; r++) {
            const int32_t *cr = corr + (size_t)r * nb * 4 + 4 * ib;
            const __m512 scale = _mm512_set1_ps(0.125f * dw[(size_t)r * nb + ib]); /* 1/8: see the header */
            for (int v = 0; v < V; v++) {
                __m512i total = acc[r][v];
                for (int pr = 0; pr < 4; pr++)
                    total = _mm512_dpwssd_epi32(total, _mm512_set1_epi32(cr[pr]), panel[ib].s32[pr][v0 + v]);
                accumulate(res + (size_t)(r * PANEL_V + v0 + v) * 16, total, scale, panel[ib].d[v0 + v]);
            }
        }
    }
}

AVX512 static void iq1_s_gemm_dispatch(const uint8_t *w, const int32_t *corr, const float *dw, size_t row_stride,
                                       const panel_block *panel, int nb, int v0, int rows, int V, float *res) {
#define GEMM_CASE(R, VV) if (rows == R && V == VV) { iq1_s_gemm_rows(w, corr, dw, row_stride, panel, nb, v0, R, VV, res); return; }
    GEMM_CASE(4, 4) GEMM_CASE(4, 3) GEMM_CASE(4, 2) GEMM_CASE(4, 1)
    GEMM_CASE(3, 4) GEMM_CASE(3, 3) GEMM_CASE(3, 2) GEMM_CASE(3, 1)
    GEMM_CASE(2, 4) GEMM_CASE(2, 3) GEMM_CASE(2, 2) GEMM_CASE(2, 1)
    GEMM_CASE(1, 4) GEMM_CASE(1, 3) GEMM_CASE(1, 2) GEMM_CASE(1, 1)
#undef GEMM_CASE
}

/* One IQ2_XXS row as signed bytes g*sign per weight, with per sub-block 2s+1 and the sum of its
 * 32 weights (to undo the +128 of unsigned activations), and the block scales. */
AVX512 static void iq2_xxs_decode_row(const block_iq2_xxs *b, int nb, int8_t *w, int32_t *ls, int32_t *wsum, float *dw) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int ib = 0; ib < nb; ib++) {
        __m512i g[4], scales;
        __mmask64 neg[4];
        iq2_xxs_block(b + ib, g, neg, &scales);
        for (int c = 0; c < 4; c++) {
            const __m512i ws = _mm512_mask_sub_epi8(g[c], neg[c], _mm512_setzero_si512(), g[c]);
            _mm512_storeu_si512(w + (size_t)ib * QK + 64 * c, ws);
            const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, ws); /* 16 sums of 4 */
            wsum[8 * ib + 2 * c] = _mm512_mask_reduce_add_epi32(0x00FF, sums);
            wsum[8 * ib + 2 * c + 1] = _mm512_mask_reduce_add_epi32(0xFF00, sums);
        }
        int32_t lanes[16];
        _mm512_storeu_si512(lanes, scales);
        for (int sb = 0; sb < 8; sb++) ls[8 * ib + sb] = lanes[2 * sb + 1];
        dw[ib] = _cvtsh_ss(b[ib].d);
    }
}

/* For `rows` (1 or 2) decoded rows, V token vectors and block ib: the integer sum over each
 * 32-weight sub-block, times the sub-block's scale (scales[8 * (r * nb + ib) + sb]), added up.
 * wsum NULL: unsigned weight bytes against signed activations; else signed weight bytes against
 * activations + 128, and wsum (the sub-blocks' weight sums, same index) takes the 128s out. */
AVX512 INLINE void scaled_sub_block_sums(const uint8_t *w, size_t row_stride, const panel_block *pb, int nb, int ib,
                                         const int32_t *scales, const int32_t *wsum, int v0, const int rows, const int V,
                                         __m512i total[2][REG_V]) {
    const int32_t *w32 = (const int32_t *)(w + (size_t)ib * QK);
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < V; v++) total[r][v] = _mm512_setzero_si512();
    for (int sb = 0; sb < 8; sb++) {
        __m512i acc[2][REG_V];
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_si512();
        for (int j = 8 * sb; j < 8 * sb + 8; j++) {
            __m512i wb[2];
            for (int r = 0; r < rows; r++) wb[r] = _mm512_set1_epi32(w32[r * row_stride / 4 + j]);
            for (int v = 0; v < V; v++) {
                const __m512i xv = pb->q[j][v0 + v];
                for (int r = 0; r < rows; r++)
                    acc[r][v] = wsum ? _mm512_dpbusd_epi32(acc[r][v], xv, wb[r]) : _mm512_dpbusd_epi32(acc[r][v], wb[r], xv);
            }
        }
        for (int r = 0; r < rows; r++) {
            const size_t k = 8 * ((size_t)r * nb + ib) + sb;
            const __m512i scale = _mm512_set1_epi32(scales[k]), shift = _mm512_set1_epi32(wsum ? 128 * wsum[k] : 0);
            for (int v = 0; v < V; v++)
                total[r][v] = _mm512_add_epi32(total[r][v], _mm512_mullo_epi32(_mm512_sub_epi32(acc[r][v], shift), scale));
        }
    }
}

/* `rows` (1 or 2) decoded IQ2_XXS rows against a panel of unsigned activations (q + 128). */
AVX512 INLINE void iq2_xxs_gemm_rows(const uint8_t *w, const int32_t *ls, const int32_t *wsum, const float *dw,
                                     size_t row_stride, const panel_block *panel, int nb, int v0, const int rows,
                                     const int V, float *res) {
    zero_results(res, rows, v0, V);
    for (int ib = 0; ib < nb; ib++) {
        __m512i total[2][REG_V];
        scaled_sub_block_sums(w, row_stride, &panel[ib], nb, ib, ls, wsum, v0, rows, V, total);
        for (int r = 0; r < rows; r++) {
            const __m512 scale = _mm512_set1_ps(0.125f * dw[(size_t)r * nb + ib]);
            for (int v = 0; v < V; v++) {
                accumulate(res + (size_t)(r * PANEL_V + v0 + v) * 16, total[r][v], scale, panel[ib].d[v0 + v]);
            }
        }
    }
}

AVX512 static void iq2_xxs_gemm_dispatch(const uint8_t *w, const int32_t *ls, const int32_t *wsum, const float *dw,
                                         size_t row_stride, const panel_block *panel, int nb, int v0, int rows, int V, float *res) {
#define GEMM_CASE(R, VV) if (rows == R && V == VV) { iq2_xxs_gemm_rows(w, ls, wsum, dw, row_stride, panel, nb, v0, R, VV, res); return; }
    GEMM_CASE(2, 4) GEMM_CASE(2, 3) GEMM_CASE(2, 2) GEMM_CASE(2, 1)
    GEMM_CASE(1, 4) GEMM_CASE(1, 3) GEMM_CASE(1, 2) GEMM_CASE(1, 1)
#undef GEMM_CASE
}

/* One Q4_K row as codes 0..15 in value order, per block the 8 sub-block scales and mins (the
 * mins as int16 pairs, for vpdpwssd with the activations' 32-sums) and d, dmin. */
AVX512 static void q4_k_decode_row(const block_q4_k *b, int nb, uint8_t *w, int32_t *sc, int32_t *min_pairs,
                                   float *dw, float *dmin) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int ib = 0; ib < nb; ib++) {
        const block_q4_k *blk = b + ib;
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * c));
            _mm256_storeu_si256((__m256i *)(w + (size_t)ib * QK + 64 * c), _mm256_and_si256(v, low4));
            _mm256_storeu_si256((__m256i *)(w + (size_t)ib * QK + 64 * c + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
        }
        uint8_t scales[8], mins[8];
        q4_k_scales(blk->scales, scales, mins);
        for (int j = 0; j < 8; j++) sc[8 * ib + j] = scales[j];
        for (int p = 0; p < 4; p++) min_pairs[4 * ib + p] = (int32_t)((uint32_t)mins[2 * p] | ((uint32_t)mins[2 * p + 1] << 16));
        dw[ib] = _cvtsh_ss(blk->d);
        dmin[ib] = _cvtsh_ss(blk->dmin);
    }
}

/* `rows` (1 or 2) decoded Q4_K rows against a panel of signed activations: per sub-block one
 * integer sum, times its scale; the mins against the 32-sums; d and dmin in float. */
AVX512 INLINE void q4_k_gemm_rows(const uint8_t *w, const int32_t *sc, const int32_t *min_pairs, const float *dw,
                                  const float *dmin, size_t row_stride, const panel_block *panel, int nb,
                                  int v0, const int rows, const int V, float *res) {
    zero_results(res, rows, v0, V);
    for (int ib = 0; ib < nb; ib++) {
        __m512i total[2][REG_V];
        scaled_sub_block_sums(w, row_stride, &panel[ib], nb, ib, sc, NULL, v0, rows, V, total);
        for (int r = 0; r < rows; r++) {
            const int32_t *mp = min_pairs + 4 * ((size_t)r * nb + ib);
            const __m512 d = _mm512_set1_ps(dw[(size_t)r * nb + ib]), dm = _mm512_set1_ps(-dmin[(size_t)r * nb + ib]);
            for (int v = 0; v < V; v++) {
                __m512i summ = _mm512_setzero_si512();
                for (int pr = 0; pr < 4; pr++) summ = _mm512_dpwssd_epi32(summ, _mm512_set1_epi32(mp[pr]), panel[ib].s32[pr][v0 + v]);
                float *out = res + (size_t)(r * PANEL_V + v0 + v) * 16;
                __m512 acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total[r][v]), _mm512_mul_ps(d, panel[ib].d[v0 + v]), _mm512_loadu_ps(out));
                _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_mul_ps(dm, panel[ib].d[v0 + v]), acc));
            }
        }
    }
}

AVX512 static void q4_k_gemm_dispatch(const uint8_t *w, const int32_t *sc, const int32_t *min_pairs, const float *dw,
                                      const float *dmin, size_t row_stride, const panel_block *panel, int nb, int v0, int rows,
                                      int V, float *res) {
#define GEMM_CASE(R, VV) if (rows == R && V == VV) { q4_k_gemm_rows(w, sc, min_pairs, dw, dmin, row_stride, panel, nb, v0, R, VV, res); return; }
    GEMM_CASE(2, 4) GEMM_CASE(2, 3) GEMM_CASE(2, 2) GEMM_CASE(2, 1)
    GEMM_CASE(1, 4) GEMM_CASE(1, 3) GEMM_CASE(1, 2) GEMM_CASE(1, 1)
#undef GEMM_CASE
}

/* Per-thread scratch of the GEMM paths: the panel and SCRATCH_ROWS decoded rows. */
#define SCRATCH_ROWS 16 /* GEMM_ROWS, or AMX_ROWS */
typedef struct {
    panel_block *panel;
    uint8_t *w, *w2; /* w2: IQ2_XXS's lo bytes on the AMX path */
    int32_t *corr, *ls, *wsum;
    float *dw, *dmin;
} gemm_scratch;

static void gemm_scratch_free(gemm_scratch *g) {
    free(g->panel);
    free(g->w);
    free(g->w2);
    free(g->corr);
    free(g->ls);
    free(g->wsum);
    free(g->dw);
    free(g->dmin);
}

static int gemm_scratch_alloc(gemm_scratch *g, int nb) {
    g->panel = aligned_alloc(64, sizeof(panel_block) * (size_t)nb);
    g->w = aligned_alloc(64, (size_t)SCRATCH_ROWS * nb * QK);
    g->w2 = aligned_alloc(64, (size_t)SCRATCH_ROWS * nb * QK);
    g->corr = malloc(sizeof(int32_t) * 4 * SCRATCH_ROWS * (size_t)nb);
    g->ls = malloc(sizeof(int32_t) * 8 * SCRATCH_ROWS * (size_t)nb);
    g->wsum = malloc(sizeof(int32_t) * 8 * SCRATCH_ROWS * (size_t)nb);
    g->dw = malloc(sizeof(float) * SCRATCH_ROWS * (size_t)nb);
    g->dmin = malloc(sizeof(float) * SCRATCH_ROWS * (size_t)nb);
    if (g->panel && g->w && g->w2 && g->corr && g->ls && g->wsum && g->dw && g->dmin) return 1;
    gemm_scratch_free(g); /* the tile kernels take over */
    return 0;
}


#define SCATTER_ROWS 16 /* rows of results gathered before they go to the pairs' rows of y */

/* res (row i, pair p at [i][p / 16][p % 16]) into y[pairs[p], r + i], rows <= 16: per pair one
 * gather of its rows and one store (stored element by element they took ~23% of an AVX-512
 * prefill op's time on Zen 4). */
AVX512 static void scatter_results(const float *res, int rows, int r, const int *pairs, int n_pairs, float *y, int y_width) {
    const __m512i row_offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                   _mm512_set1_epi32(PANEL_V * 16));
    const __mmask16 live = (__mmask16)((1u << rows) - 1);
    for (int p = 0; p < n_pairs; p++) {
        const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, row_offsets, res + (p / 16) * 16 + p % 16, 4);
        _mm512_mask_storeu_ps(y + (size_t)pairs[p] * y_width + r, live, v);
    }
}

/* Rows [r0, r1) of a matrix of `type` (IQ1_S, IQ2_XXS or Q4_K) times the up to TOKEN_BLOCK pairs whose
 * panel is in g (built with to_unsigned for IQ2_XXS); y[pairs[i], r] takes each result (as
 * rows_times_tokens). Rows go GEMM_ROWS at a time for IQ1_S, 2 for the types that sum per
 * sub-block (more accumulators). Scratch: IQ2_XXS keeps its scales in ls and its weight sums in
 * wsum; Q4_K its scales in ls and its min pairs in corr. */
AVX512 static void rows_gemm(int type, const void *wm, int nb, int r0, int r1, const gemm_scratch *g,
                             const int *pairs, int n_pairs, float *y, int y_width) {
    const int V = (n_pairs + 15) / 16, step = type == TYPE_IQ1_S ? GEMM_ROWS : 2;
    const size_t row_stride = (size_t)nb * QK;
    float res[SCATTER_ROWS * PANEL_V * 16];
    for (int r = r0; r < r1; r += step) {
        const int rows = r1 - r < step ? r1 - r : step;
        const int at = (r - r0) % SCATTER_ROWS; /* this group's first row in res */
        for (int i = 0; i < rows; i++) {
            const size_t row = (size_t)(r + i) * nb;
            uint8_t *w = g->w + i * row_stride;
            float *dw = g->dw + (size_t)i * nb;
            if (type == TYPE_IQ1_S)
                iq1_s_decode_row((const block_iq1_s *)wm + row, nb, w, g->corr + (size_t)i * 4 * nb, dw);
            else if (type == TYPE_IQ2_XXS)
                iq2_xxs_decode_row((const block_iq2_xxs *)wm + row, nb, (int8_t *)w, g->ls + (size_t)i * 8 * nb,
                                   g->wsum + (size_t)i * 8 * nb, dw);
            else
                q4_k_decode_row((const block_q4_k *)wm + row, nb, w, g->ls + (size_t)i * 8 * nb,
                                g->corr + (size_t)i * 4 * nb, dw, g->dmin + (size_t)i * nb);
        }
        float *out = res + (size_t)at * PANEL_V * 16;
        for (int v0 = 0; v0 < V; v0 += REG_V) { /* REG_V token vectors per register block */
            const int nv = V - v0 < REG_V ? V - v0 : REG_V;
            if (type == TYPE_IQ1_S)
                iq1_s_gemm_dispatch(g->w, g->corr, g->dw, row_stride, g->panel, nb, v0, rows, nv, out);
            else if (type == TYPE_IQ2_XXS)
                iq2_xxs_gemm_dispatch(g->w, g->ls, g->wsum, g->dw, row_stride, g->panel, nb, v0, rows, nv, out);
            else
                q4_k_gemm_dispatch(g->w, g->ls, g->corr, g->dw, g->dmin, row_stride, g->panel, nb, v0, rows, nv, out);
        }
        if (at + rows == SCATTER_ROWS || r + rows == r1) /* res full, or the task's last rows */
            scatter_results(res, at + rows, r - at, pairs, n_pairs, y, y_width);
    }
}

/* One function per tile size, so the token loops unroll and the accumulators stay in registers. */
#define TILE_FUNCS(name, block)                                                                       \
    AVX512 static void name##_avx512(const void *row, const block_q8 *const *x, int nt, int nb, float *out) { \
        switch (nt) {                                                                                 \
        case 1: name##_tile((const block *)row, x, 1, nb, out); break;                                \
        case 2: name##_tile((const block *)row, x, 2, nb, out); break;                                \
        case 3: name##_tile((const block *)row, x, 3, nb, out); break;                                \
        case 4: name##_tile((const block *)row, x, 4, nb, out); break;                                \
        case 5: name##_tile((const block *)row, x, 5, nb, out); break;                                \
        case 6: name##_tile((const block *)row, x, 6, nb, out); break;                                \
        case 7: name##_tile((const block *)row, x, 7, nb, out); break;                                \
        default: name##_tile((const block *)row, x, 8, nb, out); break;                               \
        }                                                                                             \
    }
TILE_FUNCS(iq1_s, block_iq1_s)
TILE_FUNCS(iq2_xxs, block_iq2_xxs)
TILE_FUNCS(q4_k, block_q4_k)
TILE_FUNCS(q6_k, block_q6_k)

static int have_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("avx512bitalg") && __builtin_cpu_supports("avx512vpopcntdq") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
}

/* ---- AMX (Sapphire Rapids and later): the same GEMMs on tile registers ----
 * TDPBUSD multiplies a tile of 16 weight rows x 64 unsigned bytes by 64 activation bytes x 16
 * tokens (signed) into 16 x 16 int32 sums: the panel above is already that B layout, one tile
 * load per 64 values with a stride of PANEL_V vectors. Per block the sums leave the tiles and
 * take the scales in vector registers, as in the GEMMs above.
 * IQ1_S: the decoded bytes (g+1)*8*(2s+1) are the A tile; the IQ1_S correction as above.
 * IQ2_XXS: g*sign*(2s+1) (|.| <= 1333) does not fit a byte, so v = that + 1333 is split into
 * hi = v >> 4 and lo = v & 15, two A tiles; dot = 16*C_hi + C_lo - 1333 * (the block's sum of
 * activations): exact, and one scale per block instead of per 32 weights. */
#define AMX_ROWS 16
#define IQ2_XXS_OFFSET 1333

#if defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#define HAVE_AMX_BUILD 1
#define AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bitalg,avx512vpopcntdq,f16c,bmi2")))
#else
#define HAVE_AMX_BUILD 0
#endif

/* Linux hands out the tile state only on request, once per process. */
static int amx_available(void) {
#if HAVE_AMX_BUILD && defined(__linux__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8") || !have_avx512()) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

#if HAVE_AMX_BUILD
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* All 8 tiles 16 x 64 bytes: 0..3 int32 sums (16 rows x 16 tokens), 4, 5 weights (16 rows x
 * 64 values), 6, 7 activations (16 groups of 4 values x 16 tokens). A constant, not built on
 * the stack: GCC 12 does not see LDTILECFG read all 64 bytes, and where amx_configure was not
 * inlined it dropped the part of a memset that zeroed tiles 8..15's fields (garbage there:
 * #GP, the process killed by SIGSEGV); the inlined copy escaped by luck. */
static const tile_config amx_tiles = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

AMX static void amx_configure(void) { _tile_loadconfig(&amx_tiles); }

/* B tile (tile 6 or 7) of the panel: groups j0.. of token vector v. */
#define LOAD_B(tile, pb, j0, v) _tile_loadd(tile, &(pb)->q[j0][v], PANEL_V * 64)

/* 16 decoded IQ1_S rows against the panel's V token vectors (rows past `rows`: stale scratch,
 * their sums are not kept). */
AMX static void iq1_s_amx_rows(const uint8_t *w, const int32_t *corr, const float *dw, size_t row_stride,
                               const panel_block *panel, int nb, int rows, int V, float *res) {
    int32_t sums[4][AMX_ROWS * 16] __attribute__((aligned(64)));
    zero_results(res, rows, 0, V);
    for (int ib = 0; ib < nb; ib++) {
        const panel_block *pb = &panel[ib];
        for (int v0 = 0; v0 < V; v0 += 4) { /* 4 token vectors per pass: tiles 0..3 */
            const int nv = V - v0 < 4 ? V - v0 : 4;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int c = 0; c < 4; c++) {
                _tile_loadd(4, w + (size_t)ib * QK + 64 * c, (long)row_stride);
                LOAD_B(6, pb, 16 * c, v0);
                _tile_dpbusd(0, 4, 6);
                if (nv > 1) { LOAD_B(7, pb, 16 * c, v0 + 1); _tile_dpbusd(1, 4, 7); }
                if (nv > 2) { LOAD_B(6, pb, 16 * c, v0 + 2); _tile_dpbusd(2, 4, 6); }
                if (nv > 3) { LOAD_B(7, pb, 16 * c, v0 + 3); _tile_dpbusd(3, 4, 7); }
            }
            _tile_stored(0, sums[0], 64);
            if (nv > 1) _tile_stored(1, sums[1], 64);
            if (nv > 2) _tile_stored(2, sums[2], 64);
            if (nv > 3) _tile_stored(3, sums[3], 64);
            for (int r = 0; r < rows; r++) {
                const int32_t *cr = corr + (size_t)r * nb * 4 + 4 * ib;
                const __m512 scale = _mm512_set1_ps(0.125f * dw[(size_t)r * nb + ib]);
                for (int k = 0; k < nv; k++) {
                    const int v = v0 + k;
                    __m512i total = _mm512_load_si512(sums[k] + 16 * r);
                    for (int pr = 0; pr < 4; pr++)
                        total = _mm512_dpwssd_epi32(total, _mm512_set1_epi32(cr[pr]), pb->s32[pr][v]);
                    accumulate(res + (size_t)(r * PANEL_V + v) * 16, total, scale, pb->d[v]);
                }
            }
        }
    }
}

/* One IQ2_XXS row as the hi and lo bytes of g*sign*(2s+1) + IQ2_XXS_OFFSET, and the block scales. */
AMX static void iq2_xxs_decode_split(const block_iq2_xxs *b, int nb, uint8_t *hi, uint8_t *lo, float *dw) {
    const __m512i offset = _mm512_set1_epi16(IQ2_XXS_OFFSET), low4 = _mm512_set1_epi16(15);
    for (int ib = 0; ib < nb; ib++) {
        __m512i g[4], scales;
        __mmask64 neg[4];
        iq2_xxs_block(b + ib, g, neg, &scales);
        int32_t lanes[16];
        _mm512_storeu_si512(lanes, scales);
        for (int c = 0; c < 4; c++)
            for (int half = 0; half < 2; half++) { /* 32 weights: sub-block 2c + half */
                const __m512i g16 = _mm512_cvtepu8_epi16(half ? _mm512_extracti64x4_epi64(g[c], 1) : _mm512_castsi512_si256(g[c]));
                const __m512i mag = _mm512_mullo_epi16(g16, _mm512_set1_epi16((short)lanes[2 * (2 * c + half) + 1]));
                const __mmask32 m = (__mmask32)(neg[c] >> (32 * half));
                const __m512i v = _mm512_add_epi16(_mm512_mask_sub_epi16(mag, m, _mm512_setzero_si512(), mag), offset);
                const size_t at = (size_t)ib * QK + 64 * c + 32 * half;
                _mm256_storeu_si256((__m256i *)(hi + at), _mm512_cvtepi16_epi8(_mm512_srli_epi16(v, 4)));
                _mm256_storeu_si256((__m256i *)(lo + at), _mm512_cvtepi16_epi8(_mm512_and_si512(v, low4)));
            }
        dw[ib] = _cvtsh_ss(b[ib].d);
    }
}

/* 16 decoded IQ2_XXS rows (hi, lo) against the panel's V token vectors (signed activations),
 * two token vectors per pass (each takes a hi and a lo tile). */
AMX static void iq2_xxs_amx_rows(const uint8_t *hi, const uint8_t *lo, const float *dw, size_t row_stride,
                                 const panel_block *panel, int nb, int rows, int V, float *res) {
    int32_t sums[4][AMX_ROWS * 16] __attribute__((aligned(64)));
    const __m512i ones = _mm512_set1_epi16(1);
    zero_results(res, rows, 0, V);
    for (int ib = 0; ib < nb; ib++) {
        const panel_block *pb = &panel[ib];
        for (int v0 = 0; v0 < V; v0 += 2) {
            const int two = V - v0 > 1;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int c = 0; c < 4; c++) {
                const size_t at = (size_t)ib * QK + 64 * c;
                _tile_loadd(4, hi + at, (long)row_stride);
                _tile_loadd(5, lo + at, (long)row_stride);
                LOAD_B(6, pb, 16 * c, v0);
                _tile_dpbusd(0, 4, 6);
                _tile_dpbusd(1, 5, 6);
                if (two) {
                    LOAD_B(7, pb, 16 * c, v0 + 1);
                    _tile_dpbusd(2, 4, 7);
                    _tile_dpbusd(3, 5, 7);
                }
            }
            _tile_stored(0, sums[0], 64);
            _tile_stored(1, sums[1], 64);
            if (two) {
                _tile_stored(2, sums[2], 64);
                _tile_stored(3, sums[3], 64);
            }
            for (int k = 0; k <= two; k++) {
                const int v = v0 + k;
                __m512i block_sum = _mm512_setzero_si512(); /* per token: its 256 activations */
                for (int pr = 0; pr < 4; pr++) block_sum = _mm512_add_epi32(block_sum, _mm512_madd_epi16(pb->s32[pr][v], ones));
                const __m512i shift = _mm512_mullo_epi32(block_sum, _mm512_set1_epi32(IQ2_XXS_OFFSET));
                for (int r = 0; r < rows; r++) {
                    const __m512i h = _mm512_load_si512(sums[2 * k] + 16 * r), l = _mm512_load_si512(sums[2 * k + 1] + 16 * r);
                    const __m512i total = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(h, 4), l), shift);
                    const __m512 scale = _mm512_set1_ps(0.125f * dw[(size_t)r * nb + ib]);
                    accumulate(res + (size_t)(r * PANEL_V + v) * 16, total, scale, pb->d[v]);
                }
            }
        }
    }
}

/* rows_gemm on tiles, for IQ1_S (panel of signed activations) and IQ2_XXS (signed too: build
 * the panel without to_unsigned). Rows go AMX_ROWS at a time; a short last group is padded
 * with whatever the scratch rows hold (integer sums only), and their results are dropped. */
AMX static void rows_gemm_amx(int type, const void *wm, int nb, int r0, int r1, const gemm_scratch *g,
                              const int *pairs, int n_pairs, float *y, int y_width) {
    const int V = (n_pairs + 15) / 16;
    const size_t row_stride = (size_t)nb * QK;
    float res[AMX_ROWS * PANEL_V * 16];
    amx_configure();
    for (int r = r0; r < r1; r += AMX_ROWS) {
        const int rows = r1 - r < AMX_ROWS ? r1 - r : AMX_ROWS;
        for (int i = 0; i < rows; i++) {
            const size_t row = (size_t)(r + i) * nb;
            if (type == TYPE_IQ1_S)
                iq1_s_decode_row((const block_iq1_s *)wm + row, nb, g->w + i * row_stride, g->corr + (size_t)i * 4 * nb,
                                 g->dw + (size_t)i * nb);
            else
                iq2_xxs_decode_split((const block_iq2_xxs *)wm + row, nb, g->w + i * row_stride, g->w2 + i * row_stride,
                                     g->dw + (size_t)i * nb);
        }
        if (type == TYPE_IQ1_S)
            iq1_s_amx_rows(g->w, g->corr, g->dw, row_stride, g->panel, nb, rows, V, res);
        else
            iq2_xxs_amx_rows(g->w, g->w2, g->dw, row_stride, g->panel, nb, rows, V, res);
        scatter_results(res, rows, r, pairs, n_pairs, y, y_width);
    }
}

AMX static void amx_done(void) { _tile_release(); }
#else
#define rows_gemm_amx rows_gemm /* never called: use_amx stays 0 */
static void amx_done(void) {}
#endif

/* A task's GEMM on AMX tiles (amx) or AVX-512. */
AVX512 static void task_gemm(int amx, int type, const void *wm, int nb, int r0, int r1, const gemm_scratch *g,
                             const int *pairs, int n_pairs, float *y, int y_width) {
    if (amx)
        rows_gemm_amx(type, wm, nb, r0, r1, g, pairs, n_pairs, y, y_width);
    else
        rows_gemm(type, wm, nb, r0, r1, g, pairs, n_pairs, y, y_width);
}
#endif /* X86 */

/* ---------------------------------------------------------------------------------------- */

typedef void (*dot_fn)(const void *row, const block_q8 *const *x, int nt, int nb, float *out);

typedef struct {
    int type, block_bytes;
    dot_fn ref, fast;
} type_info;

static type_info types[] = {
    {TYPE_IQ1_S, sizeof(block_iq1_s), dot_iq1_s_ref, NULL},
    {TYPE_IQ2_XXS, sizeof(block_iq2_xxs), dot_iq2_xxs_ref, NULL},
    {TYPE_Q4_K, sizeof(block_q4_k), dot_q4_k_ref, NULL},
    {TYPE_Q6_K, sizeof(block_q6_k), dot_q6_k_ref, NULL},
};
#define N_TYPES (int)(sizeof(types) / sizeof(types[0]))

static int use_fast = 1;
/* Activation rounding and the hidden values: vectorized where the CPU can, whatever use_fast
 * says (both give the same results, so switching kernels changes only the dot products). */
static void (*quantize_row)(const float *x, block_q8 *y, int n) = quantize_row_q8;
static void (*silu_mul)(float *g, const float *u, int n) = silu_mul_portable;
static int amx_ok = 0, use_amx = 0; /* AMX tiles usable here (tandem_set_tables), and wanted */

static const type_info *find_type(int type) {
    for (int i = 0; i < N_TYPES; i++)
        if (types[i].type == type) return &types[i];
    return NULL;
}

static dot_fn dot_for(const type_info *ti) { return use_fast && ti->fast ? ti->fast : ti->ref; }

/* Grids from the caller (gguf-py holds them): IQ1_S as 2048x8 bytes g+1, IQ2_XXS as 256x8. */
void tandem_set_tables(const uint8_t *iq1s_u, const uint8_t *iq2xxs) {
    memcpy(iq1s_grid, iq1s_u, sizeof(iq1s_grid));
    memcpy(iq2xxs_grid, iq2xxs, sizeof(iq2xxs_grid));
    for (int i = 0; i < 128; i++) iq2_signs[i] = (uint8_t)(i | ((__builtin_popcount(i) & 1) << 7));
#if X86
    for (int pair = 0; pair < 64; pair++) {
        uint8_t *lut = iq1s_scale_lut[pair];
        memset(lut, 0, 64);
        for (int half = 0; half < 2; half++) {
            const int ls = 2 * ((pair >> (3 * half)) & 7) + 1;
            for (int lane = 2 * half; lane < 2 * half + 2; lane++) {
                lut[16 * lane + 1] = (uint8_t)(8 * ls);
                lut[16 * lane + 2] = (uint8_t)(16 * ls);
            }
        }
    }
    amx_ok = use_amx = amx_available();
    if (have_avx512()) {
        types[0].fast = iq1_s_avx512;
        types[1].fast = iq2_xxs_avx512;
        types[2].fast = q4_k_avx512;
        types[3].fast = q6_k_avx512;
        quantize_row = quantize_row_q8_avx512;
        silu_mul = silu_mul_avx512;
    }
#endif
    tables_set = 1;
}

/* 1: a type has a kernel here; 2: ... and a vectorized one on this CPU. */
int tandem_type_support(int type) {
    const type_info *ti = find_type(type);
    return ti == NULL ? 0 : ti->fast ? 2 : 1;
}

/* Prefill GEMMs of IQ1_S and IQ2_XXS on AMX tiles where the CPU has them (1, default) or on
 * AVX-512 (0); returns the old value. With no AMX here it stays 0. */
int tandem_amx_available(void) { return amx_ok; }

int tandem_use_amx(int on) {
    const int old = use_amx;
    use_amx = on && amx_ok;
    return old;
}

/* g = silu(g) * u over n values (a multiple of 16), as the MoE computes it: vectorized where the
 * CPU can (1) or portable (0). For tests; returns -1 where the vectorized one is missing. */
int tandem_silu_mul(float *g, const float *u, int n, int vectorized) {
    if (n % 16) return -1;
    void (*f)(float *, const float *, int) = vectorized ? silu_mul : silu_mul_portable;
    if (vectorized && f == silu_mul_portable) return -1;
    FLUSH_DENORMALS_BEGIN
    f(g, u, n);
    FLUSH_DENORMALS_END
    return 0;
}

/* Use the vectorized kernels (1, default) or the portable ones (0); returns the old value. */
int tandem_use_fast(int on) {
    const int old = use_fast;
    use_fast = on;
    return old;
}

/* Rows [r0, r1) of a matrix times the activation rows of `pairs` (row pairs[i] / x_of_pair_div
 * of xq), TILE tokens per decoded row; y[pairs[i], r] takes each result. Tiles outside, rows
 * inside: a tile's activations stay in L1 while the task's rows (L2) pass by. */
static void rows_times_tokens(dot_fn dot, const uint8_t *w, size_t row_bytes, int nb, int r0, int r1,
                        const block_q8 *xq, const int *pairs, int n_pairs, int x_of_pair_div, float *y, int y_width) {
    for (int p0 = 0; p0 < n_pairs; p0 += TILE) {
        const int nt = n_pairs - p0 < TILE ? n_pairs - p0 : TILE;
        const block_q8 *xs[TILE];
        for (int t = 0; t < nt; t++) xs[t] = xq + (size_t)(pairs[p0 + t] / x_of_pair_div) * nb;
        for (int r = r0; r < r1; r++) {
            float res[TILE];
            dot(w + (size_t)r * row_bytes, xs, nt, nb, res);
            for (int t = 0; t < nt; t++) y[(size_t)pairs[p0 + t] * y_width + r] = res[t];
        }
    }
}

/* Work is handed out in tasks of about this many weight bytes: small enough to balance 16+
 * threads over 8 experts at decode, large enough that taking a task costs nothing. */
#define TASK_BYTES 49152
/* (token, slot) pairs per task when an expert has many (prefill): their activations stay in
 * L2 while the task's weight rows stream past once (a panel of R1's 7168 inputs: ~1 MB), and
 * each weight row is decoded once per this many tokens (on AMX the decoding costs more than
 * the products). */
#define TOKEN_BLOCK 128
static int token_block = TOKEN_BLOCK; /* tandem_set_token_block: 16..TOKEN_BLOCK, for A/B runs */
/* ... and at least this many rows (one AMX tile of weight rows; the panel is built per task). */
#define PREFILL_TASK_ROWS 16

/* Thread pinning (tandem_pin_threads, TANDEM_PIN_THREADS for A/B runs): worker t of a
 * parallel region stays on CPU pin_cpus[t] of the affinity set the process had when pinning was
 * turned on, so the OS cannot move it or stack two workers on one CPU; the caller's thread
 * (worker 0) stays free: it runs Python between calls and launches the GPU's work. A worker
 * pins itself at its first region after each change (pin_generation). */
#define MAX_PIN_CPUS 1024
static int pin_cpus[MAX_PIN_CPUS], n_pin_cpus = 0, pin_generation = 0;
static cpu_set_t pin_all; /* the process's affinity when pinning was turned on: restored when off */
static __thread int pinned_generation = 0, worker_pinned = 0;

int tandem_pin_threads(int on) {
    const int old = n_pin_cpus > 0;
    if (on && !old) {
        if (sched_getaffinity(0, sizeof(pin_all), &pin_all) != 0) return -1;
        for (int cpu = 0; cpu < CPU_SETSIZE && n_pin_cpus < MAX_PIN_CPUS; cpu++)
            if (CPU_ISSET(cpu, &pin_all)) pin_cpus[n_pin_cpus++] = cpu;
    } else if (!on) {
        n_pin_cpus = 0;
    }
    pin_generation++;
    return old;
}

/* The calling worker onto its CPU (or back to the whole set), once per pinning change. */
static void pin_this_worker(void) {
    const int t = omp_get_thread_num();
    if (t == 0 || pinned_generation == pin_generation) return;
    pinned_generation = pin_generation;
    if (n_pin_cpus > 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(pin_cpus[t % n_pin_cpus], &set);
        worker_pinned = pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
    } else if (worker_pinned) {
        pthread_setaffinity_np(pthread_self(), sizeof(pin_all), &pin_all);
        worker_pinned = 0;
    }
}

/* Fewest pairs of one expert in a task that take the GEMM path rather than the tile kernels.
 * By default it depends on the pass: a pass on AMX tiles takes AMX_GEMM_MIN_PAIRS, since a few
 * decode streams sharing an expert then decode each weight row once and multiply it on tiles
 * (8 decode streams: +24% against tiles up to 15 pairs, on a Sapphire Rapids-class Xeon). The
 * AMX path costs about the same from 1 to 16 pairs, ~1.7-2x one token's tile kernels; those
 * grow per pair, so they win up to 6: a whole UD-IQ1_S expert at 4 pairs 5.7 against 8.3 ms on
 * one thread of the dev box, 5 pairs 6.9 / 8.4, 6 pairs 8.1 / 8.2, 7 pairs 9.2 / 8.6 (one
 * process, benchmarks/kernel_ab.py); on the GPU machine 7 pairs ran alike on both (run u).
 * AVX-512 GEMMs lose below GEMM_MIN_PAIRS (measured on Zen 4). Set (1..16), one value for both
 * (A/B runs); 0 goes back to the defaults. */
static int gemm_min_pairs = 0;

static int min_pairs(int amx) {
    return gemm_min_pairs ? gemm_min_pairs : amx ? AMX_GEMM_MIN_PAIRS : GEMM_MIN_PAIRS;
}

int tandem_set_gemm_min_pairs(int n) {
    const int old = gemm_min_pairs;
    gemm_min_pairs = n < 0 ? 0 : n > GEMM_MIN_PAIRS ? GEMM_MIN_PAIRS : n;
    return old;
}

/* Pairs per prefill task (16..TOKEN_BLOCK, default TOKEN_BLOCK); returns the old value. */
int tandem_set_token_block(int n) {
    const int old = token_block;
    token_block = n < 16 ? 16 : n > TOKEN_BLOCK ? TOKEN_BLOCK : n;
    return old;
}

typedef struct {
    int expert, row0, row1, pair0, n_pairs;
} task;

static int rows_per_task(size_t row_bytes) {
    const size_t rows = TASK_BYTES / row_bytes;
    return rows < 4 ? 4 : (int)rows;
}

/* One pass's tasks (out may be NULL: count only). An expert with at most TILE pairs (decode)
 * gets row blocks of TASK_BYTES; one with more gets blocks of TOKEN_BLOCK pairs times rows worth
 * about those pairs' activation bytes, so weights and activations each cross from RAM or L3
 * about once per task instead of the activations once per row. */
static int plan_tasks(task *out, const int *count, int n_expert, int n_rows, size_t row_bytes, size_t act_bytes,
                      int gemm_from) {
    int n = 0;
    for (int e = 0; e < n_expert; e++) {
        if (!count[e]) continue;
        int rows = rows_per_task(row_bytes), pair_block = count[e];
        if (count[e] > TILE) {
            pair_block = count[e] < token_block ? count[e] : token_block;
            const size_t target = (size_t)pair_block * act_bytes;
            if (target > TASK_BYTES) rows = rows_per_task(row_bytes * TASK_BYTES / target);
            if (rows < PREFILL_TASK_ROWS) rows = PREFILL_TASK_ROWS;
        } else if (count[e] >= gemm_from) { /* the GEMM path: whole tiles of rows */
            rows = (rows + PREFILL_TASK_ROWS - 1) / PREFILL_TASK_ROWS * PREFILL_TASK_ROWS;
        }
        for (int r = 0; r < n_rows; r += rows)
            for (int p = 0; p < count[e]; p += pair_block, n++)
                if (out) {
                    const int r1 = r + rows < n_rows ? r + rows : n_rows;
                    const int np = count[e] - p < pair_block ? count[e] - p : pair_block;
                    out[n] = (task){e, r, r1, p, np};
                }
    }
    return n;
}

/* out[t, n] = dot(weight row n, x[t]) for weights [n_rows, k] of `type`: one quantized matmul. */
int tandem_matmul(const void *weight, int type, int n_rows, int k, const float *x, int n_tok, float *out, int n_threads) {
    const type_info *ti = find_type(type);
    if (!tables_set || ti == NULL || k % QK || n_tok < 1) return -1;
    const int nb = k / QK;
    block_q8 *xq = malloc(sizeof(block_q8) * (size_t)nb * n_tok);
    if (!xq) return -2;
    int *tokens = malloc(sizeof(int) * n_tok);
    if (!tokens) {
        free(xq);
        return -2;
    }
    for (int t = 0; t < n_tok; t++) tokens[t] = t;
    const dot_fn dot = dot_for(ti);
    const size_t row_bytes = (size_t)nb * ti->block_bytes;
    const int rows = rows_per_task(row_bytes);
#pragma omp parallel num_threads(n_threads)
    {
        pin_this_worker();
        FLUSH_DENORMALS_BEGIN
#pragma omp for schedule(static)
        for (int t = 0; t < n_tok; t++) quantize_row(x + (size_t)t * k, xq + (size_t)t * nb, k);
#pragma omp for schedule(dynamic, 1)
        for (int r0 = 0; r0 < n_rows; r0 += rows) {
            const int r1 = r0 + rows < n_rows ? r0 + rows : n_rows;
            rows_times_tokens(dot, weight, row_bytes, nb, r0, r1, xq, tokens, n_tok, 1, out, n_rows);
        }
        FLUSH_DENORMALS_END
    }
    free(tokens);
    free(xq);
    return 0;
}

/* ---- Work buffers of tandem_moe, kept per calling thread between calls ----
 * A 2048-token pass needs ~0.7 GB of gate, up and down results. Fresh from malloc, every call
 * paid a page fault and the kernel's zeroing for each page; kept, only the first call does.
 * They grow as needed (on 2 MB pages where the kernel allows) and go when the thread ends. */
enum { BUF_XQ, BUF_HQ, BUF_G, BUF_U, BUF_Y, N_BUFFERS };
typedef struct {
    void *p[N_BUFFERS];
    size_t n[N_BUFFERS];
} work_buffers;

static pthread_key_t buffers_key;
static pthread_once_t buffers_once = PTHREAD_ONCE_INIT;

static void free_buffers(void *arg) {
    work_buffers *b = arg;
    for (int i = 0; i < N_BUFFERS; i++) free(b->p[i]);
    free(b);
}

static void make_buffers_key(void) { pthread_key_create(&buffers_key, free_buffers); }

#define HUGE_PAGE ((size_t)2 << 20)

/* What a buffer asked for `bytes` takes: a quarter more (batches vary), in whole 2 MB pages. */
static size_t buffer_size(size_t bytes) { return (bytes + bytes / 4 + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE; }

/* Bytes of work buffers a thread keeps after a tandem_moe call with n_tok tokens (the memory
 * planner counts them). */
size_t tandem_moe_work_bytes(int n_tok, int k, int d, int n_ff) {
    const size_t pairs = (size_t)n_tok * k;
    return buffer_size(sizeof(block_q8) * (size_t)n_tok * (d / QK)) + buffer_size(sizeof(block_q8) * pairs * (n_ff / QK)) +
           2 * buffer_size(sizeof(float) * pairs * n_ff) + buffer_size(sizeof(float) * pairs * d);
}

/* Buffer i of this thread with at least `bytes`, or NULL when out of memory. */
static void *work_buffer(int i, size_t bytes) {
    pthread_once(&buffers_once, make_buffers_key);
    work_buffers *b = pthread_getspecific(buffers_key);
    if (!b) {
        b = calloc(1, sizeof(*b));
        if (!b || pthread_setspecific(buffers_key, b)) {
            free(b);
            return NULL;
        }
    }
    if (b->n[i] >= bytes) return b->p[i];
    free(b->p[i]);
    const size_t n = buffer_size(bytes);
    b->p[i] = aligned_alloc(HUGE_PAGE, n);
    b->n[i] = b->p[i] ? n : 0;
#ifdef MADV_HUGEPAGE
    if (b->p[i]) madvise(b->p[i], n, MADV_HUGEPAGE);
#endif
    return b->p[i];
}

/* The routed experts of one MoE layer, see the header. x [T, d]; ids, w [T, k]; gate and up
 * [E, n_ff, d], down [E, d, n_ff]; out [T, d]. A slot whose id is SKIPPED_SLOT adds nothing (its
 * expert is computed elsewhere, e.g. on the GPU). Returns 0, or <0 for unsupported input. */
int tandem_moe(const float *x, int n_tok, int d, const int32_t *ids, const float *w, int k,
               const void *gate, int gate_type, const void *up, int up_type, const void *down, int down_type,
               int n_expert, int n_ff, float *out, int n_threads) {
    const type_info *tg = find_type(gate_type), *tu = find_type(up_type), *td = find_type(down_type);
    if (!tables_set || !tg || !tu || !td || d % QK || n_ff % QK) return -1;
    const int nb_d = d / QK, nb_ff = n_ff / QK, n_pairs = n_tok * k;
    const size_t gate_row = (size_t)nb_d * tg->block_bytes, up_row = (size_t)nb_d * tu->block_bytes;
    const size_t down_row = (size_t)nb_ff * td->block_bytes;

    /* pairs p = t*k + j grouped by expert (counting sort) */
    int *count = calloc(n_expert + 1, sizeof(int)), *start = malloc(sizeof(int) * (n_expert + 1));
    int *order = malloc(sizeof(int) * n_pairs);
    block_q8 *xq = work_buffer(BUF_XQ, sizeof(block_q8) * (size_t)n_tok * nb_d);
    block_q8 *hq = work_buffer(BUF_HQ, sizeof(block_q8) * (size_t)n_pairs * nb_ff);
    float *g = work_buffer(BUF_G, sizeof(float) * (size_t)n_pairs * n_ff);
    float *u = work_buffer(BUF_U, sizeof(float) * (size_t)n_pairs * n_ff);
    float *y = work_buffer(BUF_Y, sizeof(float) * (size_t)n_pairs * d);
    task *up_tasks = NULL, *down_tasks = NULL;
    int rc = 0;
    if (!count || !start || !order || !xq || !hq || !g || !u || !y) {
        rc = -2;
        goto done;
    }
    for (int p = 0; p < n_pairs; p++) {
        if (ids[p] < SKIPPED_SLOT || ids[p] >= n_expert) {
            rc = -3;
            goto done;
        }
        if (ids[p] != SKIPPED_SLOT) count[ids[p]]++;
    }
    start[0] = 0;
    for (int e = 0; e < n_expert; e++) start[e + 1] = start[e] + count[e];
    memset(count, 0, sizeof(int) * n_expert);
    for (int p = 0; p < n_pairs; p++)
        if (ids[p] != SKIPPED_SLOT) order[start[ids[p]] + count[ids[p]]++] = p;

    const dot_fn dot_gate = dot_for(tg), dot_up = dot_for(tu), dot_down = dot_for(td);
    /* gate and up (IQ1_S or Q4_K), down (IQ2_XXS) with many tokens per expert: the GEMM paths
     * (AVX-512 only) */
    const int gemm = X86 && tg->fast && dot_gate == tg->fast && tg->type == tu->type &&
                     (tg->type == TYPE_IQ1_S || tg->type == TYPE_Q4_K);
    const int gemm_down = X86 && td->fast && dot_down == td->fast && td->type == TYPE_IQ2_XXS;
    const int amx_up = gemm && use_amx && tg->type == TYPE_IQ1_S, amx_down = gemm_down && use_amx;
    const int up_gemm_from = min_pairs(amx_up), down_gemm_from = min_pairs(amx_down);

    /* tasks of the gate/up pass (one task does both matrices) and of the down pass */
    const size_t x_bytes = sizeof(block_q8) * (size_t)nb_d, h_bytes = sizeof(block_q8) * (size_t)nb_ff;
    const int n_up_tasks = plan_tasks(NULL, count, n_expert, n_ff, gate_row + up_row, x_bytes, up_gemm_from);
    const int n_down_tasks = plan_tasks(NULL, count, n_expert, d, down_row, h_bytes, down_gemm_from);
    up_tasks = malloc(sizeof(task) * (size_t)(n_up_tasks + 1));
    down_tasks = malloc(sizeof(task) * (size_t)(n_down_tasks + 1));
    if (!up_tasks || !down_tasks) {
        rc = -2;
        goto done;
    }
    plan_tasks(up_tasks, count, n_expert, n_ff, gate_row + up_row, x_bytes, up_gemm_from);
    plan_tasks(down_tasks, count, n_expert, d, down_row, h_bytes, down_gemm_from);

#pragma omp parallel num_threads(n_threads)
    {
        pin_this_worker();
        FLUSH_DENORMALS_BEGIN
#if X86
        gemm_scratch scratch = {0};
        const int have_scratch = (gemm || gemm_down) && gemm_scratch_alloc(&scratch, nb_d > nb_ff ? nb_d : nb_ff);
        int used_amx = 0;
#endif
#pragma omp for schedule(static)
        for (int t = 0; t < n_tok; t++) quantize_row(x + (size_t)t * d, xq + (size_t)t * nb_d, d);
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_up_tasks; i++) {
            const task tk = up_tasks[i];
            const int *pairs = order + start[tk.expert] + tk.pair0;
            const uint8_t *gate_e = (const uint8_t *)gate + (size_t)tk.expert * n_ff * gate_row;
            const uint8_t *up_e = (const uint8_t *)up + (size_t)tk.expert * n_ff * up_row;
#if X86
            if (gemm && have_scratch && tk.n_pairs >= up_gemm_from) {
                build_panel(xq, nb_d, pairs, tk.n_pairs, k, 0, scratch.panel);
                used_amx |= amx_up;
                task_gemm(amx_up, tg->type, gate_e, nb_d, tk.row0, tk.row1, &scratch, pairs, tk.n_pairs, g, n_ff);
                task_gemm(amx_up, tu->type, up_e, nb_d, tk.row0, tk.row1, &scratch, pairs, tk.n_pairs, u, n_ff);
                continue;
            }
#endif
            rows_times_tokens(dot_gate, gate_e, gate_row, nb_d, tk.row0, tk.row1, xq, pairs, tk.n_pairs, k, g, n_ff);
            rows_times_tokens(dot_up, up_e, up_row, nb_d, tk.row0, tk.row1, xq, pairs, tk.n_pairs, k, u, n_ff);
        }
#pragma omp for schedule(static)
        for (int p = 0; p < n_pairs; p++) {
            if (ids[p] == SKIPPED_SLOT) continue;
            float *gp = g + (size_t)p * n_ff;
            silu_mul(gp, u + (size_t)p * n_ff, n_ff);
            quantize_row(gp, hq + (size_t)p * nb_ff, n_ff);
        }
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_down_tasks; i++) {
            const task tk = down_tasks[i];
#if X86
            if (gemm_down && have_scratch && tk.n_pairs >= down_gemm_from) {
                const int *pairs = order + start[tk.expert] + tk.pair0;
                const uint8_t *down_e = (const uint8_t *)down + (size_t)tk.expert * d * down_row;
                /* AVX-512 takes the activations as q + 128; AMX the weights as the unsigned side */
                build_panel(hq, nb_ff, pairs, tk.n_pairs, 1, !amx_down, scratch.panel);
                used_amx |= amx_down;
                task_gemm(amx_down, td->type, down_e, nb_ff, tk.row0, tk.row1, &scratch, pairs, tk.n_pairs, y, d);
                continue;
            }
#endif
            rows_times_tokens(dot_down, (const uint8_t *)down + (size_t)tk.expert * d * down_row, down_row, nb_ff,
                              tk.row0, tk.row1, hq, order + start[tk.expert] + tk.pair0, tk.n_pairs, 1, y, d);
        }
#pragma omp for schedule(static)
        for (int t = 0; t < n_tok; t++) {
            float *o = out + (size_t)t * d;
            for (int i = 0; i < d; i++) o[i] = 0.f;
            for (int j = 0; j < k; j++) {
                if (ids[(size_t)t * k + j] == SKIPPED_SLOT) continue;
                const float wj = w[(size_t)t * k + j];
                const float *yp = y + ((size_t)t * k + j) * d;
                for (int i = 0; i < d; i++) o[i] += wj * yp[i];
            }
        }
#if X86
        if (have_scratch) gemm_scratch_free(&scratch);
        if (used_amx) amx_done(); /* this thread's tiles back to the init state */
#endif
        FLUSH_DENORMALS_END
    }
done:
    free(count);
    free(start);
    free(order);
    free(up_tasks);
    free(down_tasks);
    return rc;
}

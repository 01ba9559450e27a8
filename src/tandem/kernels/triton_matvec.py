"""A hand-written Triton matvec for weights kept in Q4_K or Q6_K on the GPU (kernel quant: the
projections, dense and shared FFN and head of published DeepSeek GGUFs): y [M, N] = x [M, K]
times W [N, K] transposed, for the few rows of a decode step.

The torch.compile'd dequantize-multiply of kernels.quant_linear decoded UD-IQ1_S-like files
at 21.3 tok/s against 46.9 with bfloat16 copies (run p). Here each program takes R weight rows,
decodes one 256-weight block of each into registers ([R, 8, 32]: sub-block, value) and
multiplies it with the block's activations of every input row. Float32 sums, as ggml's
dequantization (w = d * sc * q - dmin * m for Q4_K, d * sc * (q - 32) for Q6_K).

Matrices with few rows split their blocks too (split-K): R1's kv_a (576 rows) made 36 programs
on a GPU of 132 SMs, each walking 28 blocks one after another, and the layer's quantized weights
decoded at ~330 GB/s against bfloat16 copies' ~1.1 TB/s (run v). Then each program sums a run
of blocks into its own partial row of y, and the partials are added afterwards.
QuantLinear takes it by default where Triton imports (TANDEM_QUANT_TRITON=0: the compiled one).
A second kernel takes the products as 8-bit integer dot products (KERNELS, below).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tandem.gguf.types import GGMLType, block_bytes

TYPES = {GGMLType.Q4_K: 0, GGMLType.Q6_K: 1}  # the kernel's TYPE
ROWS = 16  # weight rows per program
MAX_INPUT_ROWS = 8  # x rows a call takes (decode steps of up to 8 sequences)
PROGRAMS = 1024  # programs a call aims at, splitting blocks where rows alone make fewer
MIN_SPLIT_BLOCKS = 4  # blocks a program walks at least when split
# Rows of fewer blocks are not split: their walk is short, and the partials' sum costs more
# (the shared expert's down projection, 8 blocks: 11.4 us whole, 12.7 split; run v)
SPLIT_FROM_BLOCKS = 16
# Two kernels: `values` dequantizes every weight of R rows' blocks ([R, 8, 32] bytes, each qs
# byte loaded once per nibble, Q6_K's scales once per value) and multiplies; `q8` quantizes the
# activations too, once a call, in 8-bit blocks of 32 as llama.cpp's CUDA matvecs do, and takes
# the products as integer dot products of 4 bytes (dp4a): no weight is turned into a float. In
# the sm_90 SASS of a loop iteration (tests/kernels/test_triton_compile.py compiles them without
# a GPU) values spends 13 instructions a Q4_K weight and 35 a Q6_K one, q8 4.1 and 5.5. In run A
# (benchmarks/results/quant_matvec-*-20261129A.*) q8 summed its dp4a products across threads
# every block (48 shuffles, 4 barriers and shared-memory stores an iteration); now each thread
# chains its dp4a over the words it loads (as llama.cpp's MMVQ) and sums across threads only
# after the loop (165 instructions an iteration of 32 Q4_K rows against 275, no barrier). Run
# B's sweep (quant_matvec-sweep-*-20261129B.*, R1's shapes, one input row) timed that kernel
# fastest at one (row, group) pair a thread in few warps (Q8_TILES): Q4_K at 16 rows and 2 warps
# 49.5 us for the dense up projection (bfloat16 cuBLAS 70.0, values 81.5) and 68.5 for the
# attention output (60.9, 72.1); Q6_K at 64 rows and 4 warps 106.6 us for the dense down (70.5,
# 128.1) and 645 for the head (409, 669), but behind values on rows of few blocks (kv_b, 512
# inputs: 16.3 against 14.0: the activations' extra pass costs more than the short walk saves).
# At 8 input rows values was faster on every shape (the head 2785 against 3022 us). So
# `kernel_for` picks q8 for one input row of Q4_K, and of Q6_K from Q8_FROM_BLOCKS blocks a row,
# values otherwise; TANDEM_QUANT_MATVEC=values or q8 sends every call through one
# (A/B runs). A third kernel, `sums` (each byte loaded once, sub-block scales on sums), was
# slower than values on every shape but one in run A's sweep and was removed.
KERNELS = ("values", "q8")
KERNEL = os.environ.get("TANDEM_QUANT_MATVEC") or None  # None: kernel_for's choice
Q8_MAX_INPUT_ROWS = 1  # more take values (run B timed 1 and 8 rows: values faster at 8 on every shape)
Q8_FROM_BLOCKS = {GGMLType.Q4_K: 1, GGMLType.Q6_K: 16}  # blocks a row from which q8 is taken
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter runs no PTX
Q8_GROUPS = 32  # activation blocks a program of _q8_activations_kernel quantizes
# Kernel q8's (rows, warps) a program: a thread takes (row, 32-byte group) pairs of Q4_K, 4 a
# block, and (row, half) pairs of Q6_K, 2 a block, so both tiles give each thread one pair
# (run B's sweep, above; values keeps ROWS rows and 4 warps).
Q8_TILES = {GGMLType.Q4_K: (16, 2), GGMLType.Q6_K: (64, 4)}
VALUES_WARPS = 4


@triton.jit
def f16_at(p):
    """The little-endian float16 at byte pointers p, as float32."""
    bits = tl.load(p).to(tl.int32) | (tl.load(p + 1).to(tl.int32) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def q4_k_scale_min(at, s):
    """Scales and mins of sub-blocks s [U] of the Q4_K blocks whose 12 scale bytes are at byte
    pointers at [R, U], as float32 [R, U] (ggml's get_scale_min_k4)."""
    low = s < 4
    a = tl.load(at + s[None, :]).to(tl.int32)  # scales[s]
    b = tl.load(at + s[None, :] + 4).to(tl.int32)  # scales[s + 4]
    c = tl.load(at + tl.where(low, s, s - 4)[None, :]).to(tl.int32)  # scales[s - 4] (s >= 4)
    sc = tl.where(low[None, :], a & 63, (b & 15) | ((c >> 6) << 4))
    m = tl.where(low[None, :], b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def q4_k_values(blk):
    """Q4_K blocks at byte pointers blk [R] as float32 weights [R, 8, 32]: value 32 s + i of a
    block is nibble s % 2 of byte 32 (s // 2) + i of qs; sub-block s has a 6-bit scale and
    min packed in 12 bytes (ggml's get_scale_min_k4)."""
    s = tl.arange(0, 8)
    i = tl.arange(0, 32)
    sc, m = q4_k_scale_min(blk[:, None] + 4, s)
    scale = f16_at(blk)[:, None] * sc  # [R, 8]
    minimum = f16_at(blk + 2)[:, None] * m
    byte = tl.load(blk[:, None, None] + 16 + 32 * (s[None, :, None] // 2) + i[None, None, :]).to(tl.int32)
    q = (byte >> (4 * (s[None, :, None] % 2))) & 15
    return scale[:, :, None] * q.to(tl.float32) - minimum[:, :, None]


@triton.jit
def q6_k_values(blk):
    """Q6_K blocks at byte pointers blk [R] as float32 weights [R, 8, 32]: value v = 32 s + i
    lies in half n = s // 4, quarter k = s % 4: low 4 bits from ql[64 n + 32 (k % 2) + i] (high
    nibble when k >= 2), 2 high bits from qh[32 n + i] >> 2 k; scale scales[8 n + 2 k + i // 16]."""
    s = tl.arange(0, 8)
    i = tl.arange(0, 32)
    n = s[None, :, None] // 4
    k = s[None, :, None] % 4
    ii = i[None, None, :]
    ql = tl.load(blk[:, None, None] + 64 * n + 32 * (k % 2) + ii).to(tl.int32)
    qh = tl.load(blk[:, None, None] + 128 + 32 * n + ii).to(tl.int32)
    q = ((ql >> (4 * (k // 2))) & 15) | (((qh >> (2 * k)) & 3) << 4)
    sc = tl.load(blk[:, None, None] + 192 + 8 * n + 2 * k + ii // 16).to(tl.int8).to(tl.float32)
    return f16_at(blk + 208)[:, None, None] * sc * (q - 32).to(tl.float32)


@triton.jit
def program_rows(w, n_out, n_blocks, per_split, row_bytes, R: tl.constexpr):
    """This program's R weight rows (indices, which exist, their byte pointers) and its run of
    blocks [first, end): split tl.program_id(1) of per_split blocks each."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    first = tl.program_id(1) * per_split
    inside = rows < n_out
    return rows, inside, w + tl.where(inside, rows, 0).to(tl.int64) * row_bytes, first, \
        tl.minimum(first + per_split, n_blocks)


@triton.jit
def _matvec_kernel(w, x, y, n_out, n_blocks, per_split, row_bytes, n_in, m_rows, TYPE: tl.constexpr,
                   BLOCK: tl.constexpr, R: tl.constexpr, M: tl.constexpr):
    """y[k, m, r] = W[r] . x[m] over the k-th run of per_split blocks, for R rows r of this
    program and the m_rows (<= M) rows of x."""
    rows, inside, base, first, end = program_rows(w, n_out, n_blocks, per_split, row_bytes, R)
    s = tl.arange(0, 8)
    i = tl.arange(0, 32)
    ms = tl.arange(0, M)
    total = tl.zeros([M, R], dtype=tl.float32)
    for b in range(first, end):
        blk = base + b * BLOCK
        if TYPE == 0:  # noqa: SIM108 (a statement Triton resolves at compile time)
            values = q4_k_values(blk)
        else:
            values = q6_k_values(blk)
        for m in range(m_rows):
            xb = tl.load(x + m * n_in + b * 256 + s[:, None] * 32 + i[None, :])  # [8, 32]
            part = tl.sum(tl.sum(values * xb[None, :, :], axis=2), axis=1)  # [R]
            total += tl.where(ms[:, None] == m, part[None, :], 0.0)
    out = y + tl.program_id(1).to(tl.int64) * m_rows * n_out
    tl.store(out + ms[:, None] * n_out + rows[None, :], total, mask=(ms[:, None] < m_rows) & inside[None, :])


@triton.jit
def dot4(a, b, acc, INTERPRET: tl.constexpr):
    """acc plus, per int32 lane, the dot product of a's 4 unsigned bytes and b's 4 signed ones
    (PTX dp4a; spelled out in Triton's interpreter, which runs no PTX)."""
    if INTERPRET:
        for k in tl.static_range(4):
            acc += ((a >> (8 * k)) & 255) * ((b << (24 - 8 * k)) >> 24)
        return acc
    else:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def q8_words(xb):
    """Activations xb [G, 32] float32 in 8-bit blocks of 32, as gguf's Q8_0 quantizes them
    (d = max |x| / 127, q = x / d rounded half away from zero) but with d kept in float32:
    the bytes 4 at a time as int32 words [G, 8] (4w + i in byte i of word w), d [G] and each
    word's sum of q [G, 8]."""
    d = tl.max(tl.abs(xb), axis=1) / 127.0
    inverse = tl.where(d == 0.0, 0.0, 1.0 / tl.where(d == 0.0, 1.0, d))  # all-zero blocks: q = 0
    v = tl.abs(xb * inverse[:, None])
    whole = tl.floor(v)
    q = (whole + tl.floor(2.0 * (v - whole))).to(tl.int32)
    q = tl.where(xb < 0.0, -q, q)
    q = tl.reshape(q, [xb.shape[0], 8, 4])
    packed = (q & 255) << (8 * tl.arange(0, 4))[None, None, :]
    return tl.sum(packed, axis=2), d, tl.sum(q, axis=2)


@triton.jit
def _q8_activations_kernel(x, qx, dx, qsum16, n_groups, G: tl.constexpr):
    """The rows of x (float32, contiguous) in 8-bit blocks of 32 (q8_words), G blocks a program:
    qx their bytes as int32 words (8 a block), dx their scales, qsum16 the sums of q per 16
    values (2 a block)."""
    group = tl.program_id(0) * G + tl.arange(0, G)
    inside = group < n_groups
    xb = tl.load(x + group[:, None] * 32 + tl.arange(0, 32)[None, :], mask=inside[:, None], other=0.0)
    words, d, word_sums = q8_words(xb)
    tl.store(qx + group[:, None] * 8 + tl.arange(0, 8)[None, :], words, mask=inside[:, None])
    tl.store(dx + group, d, mask=inside)
    halves = tl.sum(tl.reshape(word_sums, [G, 2, 4]), axis=2)
    tl.store(qsum16 + group[:, None] * 2 + tl.arange(0, 2)[None, :], halves, mask=inside[:, None])


@triton.jit
def exact_float(i):
    """Integers |i| < 2^22 as float32 by two full-rate operations (int-to-float conversion runs
    at a quarter of the rate): i + 1.5 * 2^23 has i in its mantissa."""
    return (i + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def q4_k_header(blk):
    """d, dmin [R] and the sub-blocks' scales and mins as bytes of words [R] (scales 0-3,
    scales 4-7, mins 0-3, mins 4-7) of Q4_K blocks at 16-aligned byte pointers blk [R], from
    their first 16 bytes as 4 words (ggml's unpacking of the 12 packed 6-bit fields)."""
    head = blk.to(tl.pointer_type(tl.int32))
    w0 = tl.load(head)
    w1 = tl.load(head + 1)
    w2 = tl.load(head + 2)
    w3 = tl.load(head + 3)
    d = (w0 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    low6, low4, top2 = 0x3F3F3F3F, 0x0F0F0F0F, 0x03030303
    scales_high = (w3 & low4) | (((w1 >> 6) & top2) << 4)
    mins_high = ((w3 >> 4) & low4) | (((w2 >> 6) & top2) << 4)
    return d, dmin, w1 & low6, scales_high, w2 & low6, mins_high


@triton.jit
def _q4_k_q8_kernel(w, qx, dx, qsum16, y, n_out, n_blocks, per_split, row_bytes, n_in, m_rows,
                    R: tl.constexpr, M: tl.constexpr, INTERPRET: tl.constexpr):
    """y[k, m, r] = W[r] . q8(x[m]) over the k-th run of blocks, for Q4_K, the activations
    quantized beforehand (_q8_activations_kernel) in blocks of 32 that match Q4_K's
    sub-blocks. Each thread takes (row, group c) pairs: group c's qs bytes 32c .. 32c + 31 as 8
    words, word j holding values 64c + 4j .. + 3 in its bytes' low nibbles (sub-block 2c) and
    64c + 32 + 4j .. + 3 in their high ones (2c + 1), each nibble set times activation word j of
    its block by dp4a, chained in the thread over j (as llama.cpp's MMVQ): no sums across
    threads inside the loop. The sub-block's sum is scaled by d sc dx, the mins taken off as
    dmin m dx sum(qx); float sums stay per group and row until after the loop."""
    rows, inside, base, first, end = program_rows(w, n_out, n_blocks, per_split, row_bytes, R)
    c = tl.arange(0, 4)
    ms = tl.arange(0, M)
    live = ms < m_rows
    x_live = live[:, None, None]
    low_half = (c < 2)[None, :]  # sub-blocks 2c + n below 4
    in_layout = (rows * 0)[None, :, None]  # [1, R, 1]: activations loaded per thread, no shuffles
    acc = tl.zeros([M, R, 4], dtype=tl.float32)
    for b in range(first, end):
        blk = base + b * 144
        word0 = blk.to(tl.pointer_type(tl.int32))[:, None] + 4 + 8 * c[None, :]  # [R, 4]: qs words
        d, dmin, sc_low, sc_high, m_low, m_high = q4_k_header(blk)
        block = b * 8 + 2 * c  # [4]: the activations' 32-block of sub-block 2c
        x0 = qx + ms[:, None, None] * (n_in // 4) + 8 * block[None, None, :] + in_layout  # [M, R, 4]
        dots_low = tl.zeros([M, R, 4], dtype=tl.int32)
        dots_high = tl.zeros([M, R, 4], dtype=tl.int32)
        for j in tl.static_range(8):
            word = tl.load(word0 + j)[None]
            dots_low = dot4(word & 0x0F0F0F0F, tl.load(x0 + j, mask=x_live, other=0), dots_low, INTERPRET)
            dots_high = dot4((word >> 4) & 0x0F0F0F0F, tl.load(x0 + 8 + j, mask=x_live, other=0), dots_high,
                             INTERPRET)
        for n in tl.static_range(2):
            if n == 0:  # noqa: SIM108 (resolved at compile time)
                dots = dots_low
            else:
                dots = dots_high
            shift = (8 * ((2 * c + n) % 4))[None, :]  # sub-block 2c + n's byte in its word
            sc = (tl.where(low_half, sc_low[:, None], sc_high[:, None]) >> shift) & 0xFF  # [R, 4]
            mn = (tl.where(low_half, m_low[:, None], m_high[:, None]) >> shift) & 0xFF
            scale_at = dx + ms[:, None] * (n_in // 32) + block[None, :] + n
            scale = tl.load(scale_at, mask=live[:, None], other=0.0)  # [M, 4]
            at = qsum16 + ms[:, None] * (n_in // 16) + 2 * (block[None, :] + n)
            qsum = tl.load(at, mask=live[:, None], other=0) + tl.load(at + 1, mask=live[:, None], other=0)
            per_group = (d[:, None] * exact_float(sc))[None] * scale[:, None, :]  # [M, R, 4]
            mins = (dmin[:, None] * exact_float(mn))[None] * (scale * exact_float(qsum))[:, None, :]
            acc += per_group * exact_float(dots) - mins
    total = tl.sum(acc, axis=2)  # [M, R]
    out = y + tl.program_id(1).to(tl.int64) * m_rows * n_out
    tl.store(out + ms[:, None] * n_out + rows[None, :], total, mask=live[:, None] & inside[None, :])


@triton.jit
def words_at(p):
    """The little-endian int32 words at 2-aligned byte pointers p (Q6_K's 210-byte blocks allow
    no 4-aligned loads), from two 16-bit loads each."""
    half = p.to(tl.pointer_type(tl.int16))
    return (tl.load(half).to(tl.int32) & 0xFFFF) | (tl.load(half + 1).to(tl.int32) << 16)


@triton.jit
def signed_byte(words, i):
    """Byte i of each int32 word, as a signed value in float32."""
    return exact_float(((words >> (8 * i)) << 24) >> 24)


@triton.jit
def q6_k_quads(low, high, k: tl.constexpr):
    """Four 6-bit weights of run k (of 4) of a Q6_K half from a ql word `low` (nibble k // 2)
    and a qh word `high` (bits 2k), one a byte."""
    return ((low >> (4 * (k // 2))) & 0x0F0F0F0F) | (((high >> (2 * k)) & 0x03030303) << 4)


@triton.jit
def q6_k_dot(low, high, k: tl.constexpr, x_at, x_live, acc, INTERPRET: tl.constexpr):
    """acc plus the dp4a of run k's four weights (q6_k_quads) with the activation word at x_at."""
    return dot4(q6_k_quads(low, high, k), tl.load(x_at, mask=x_live, other=0), acc, INTERPRET)


@triton.jit
def q6_k_group_sums(dots, k: tl.constexpr, g: tl.constexpr, d, scales_low, scales_high, x_scale_at, x_sum_at,
                    x_live):
    """Float sums [M, R, 2] of 16-value group g of run k in each half: the products' sum `dots`
    less 32 times the activations' sum, times d, the group's scale scales[8h + 2k + g] and the
    activations' dx (x_scale_at, x_sum_at: run 0's dx and first qsum16 per half)."""
    if k < 2:  # noqa: SIM108 (resolved at compile time)
        scale_words = scales_low
    else:
        scale_words = scales_high
    weight_scale = d * signed_byte(scale_words, 2 * (k % 2) + g)  # [R, 2]
    x_scale = tl.load(x_scale_at + k, mask=x_live, other=0.0)
    x_sum = tl.load(x_sum_at + 2 * k + g, mask=x_live, other=0)
    return weight_scale[None] * x_scale * exact_float(dots - 32 * x_sum)


@triton.jit
def _q6_k_q8_kernel(w, qx, dx, qsum16, y, n_out, n_blocks, per_split, row_bytes, n_in, m_rows,
                    R: tl.constexpr, M: tl.constexpr, INTERPRET: tl.constexpr):
    """Kernel q8 for Q6_K: each thread takes (row, half h) pairs. Run k (of 4) of half h holds
    values 128h + 32k + 4w + i for words w = 0..7: nibble k // 2 of ql word 64h + 32(k % 2) + 4w
    and bits 2k of qh word 128 + 32h + 4w, each byte's, make 4 weights at once; their dp4a with
    activation word w of block 8b + 4h + k is chained in the thread over a 16-value group's 4
    words (g = w // 4), then the group sum less 32 times its activations' sum is scaled by d,
    scales[8h + 2k + g] and dx. Float sums per half and row until after the loop."""
    rows, inside, base, first, end = program_rows(w, n_out, n_blocks, per_split, row_bytes, R)
    h = tl.arange(0, 2)
    ms = tl.arange(0, M)
    live = ms < m_rows
    x_live = live[:, None, None]
    in_layout = (rows * 0)[None, :, None]  # [1, R, 1]: activations loaded per thread
    acc = tl.zeros([M, R, 2], dtype=tl.float32)
    for b in range(first, end):
        blk = base + b * 210
        row = blk[:, None]  # [R, 1]
        scales_low = words_at(row + 192 + 8 * h[None, :])  # [R, 2]: scales 8h .. 8h + 3
        scales_high = words_at(row + 196 + 8 * h[None, :])  # scales 8h + 4 .. 8h + 7
        d = f16_at(blk + 208)[:, None]
        block = (b * 8 + 4 * h)[None, None, :] + in_layout  # [1, R, 2]: the activations' 32-block of run 0
        x0 = qx + ms[:, None, None] * (n_in // 4) + 8 * block  # [M, R, 2]
        x_scale_at = dx + ms[:, None, None] * (n_in // 32) + block
        x_sum_at = qsum16 + ms[:, None, None] * (n_in // 16) + 2 * block
        for g in tl.static_range(2):
            dots0 = tl.zeros([M, R, 2], dtype=tl.int32)
            dots1 = tl.zeros([M, R, 2], dtype=tl.int32)
            dots2 = tl.zeros([M, R, 2], dtype=tl.int32)
            dots3 = tl.zeros([M, R, 2], dtype=tl.int32)
            for i in tl.static_range(4):
                word = 4 * g + i
                low_even = words_at(row + 64 * h[None, :] + 4 * word)[None]  # [1, R, 2]
                low_odd = words_at(row + 64 * h[None, :] + 32 + 4 * word)[None]
                high = words_at(row + 128 + 32 * h[None, :] + 4 * word)[None]
                dots0 = q6_k_dot(low_even, high, 0, x0 + word, x_live, dots0, INTERPRET)
                dots1 = q6_k_dot(low_odd, high, 1, x0 + 8 + word, x_live, dots1, INTERPRET)
                dots2 = q6_k_dot(low_even, high, 2, x0 + 16 + word, x_live, dots2, INTERPRET)
                dots3 = q6_k_dot(low_odd, high, 3, x0 + 24 + word, x_live, dots3, INTERPRET)
            acc += q6_k_group_sums(dots0, 0, g, d, scales_low, scales_high, x_scale_at, x_sum_at, x_live)
            acc += q6_k_group_sums(dots1, 1, g, d, scales_low, scales_high, x_scale_at, x_sum_at, x_live)
            acc += q6_k_group_sums(dots2, 2, g, d, scales_low, scales_high, x_scale_at, x_sum_at, x_live)
            acc += q6_k_group_sums(dots3, 3, g, d, scales_low, scales_high, x_scale_at, x_sum_at, x_live)
    total = tl.sum(acc, axis=2)
    out = y + tl.program_id(1).to(tl.int64) * m_rows * n_out
    tl.store(out + ms[:, None] * n_out + rows[None, :], total, mask=live[:, None] & inside[None, :])


def q8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 (contiguous) for kernel q8: its 8-bit blocks' bytes as int32 words
    [M, K / 4], their scales [M, K / 32] and sums of q per 16 values [M, K / 16]."""
    m_rows, n_in = x.shape
    qx = torch.empty(m_rows, n_in // 4, dtype=torch.int32, device=x.device)
    dx = torch.empty(m_rows, n_in // 32, dtype=torch.float32, device=x.device)
    qsum16 = torch.empty(m_rows, n_in // 16, dtype=torch.int32, device=x.device)
    n_groups = m_rows * n_in // 32
    _q8_activations_kernel[(triton.cdiv(n_groups, Q8_GROUPS),)](x, qx, dx, qsum16, n_groups, G=Q8_GROUPS)
    return qx, dx, qsum16


def _q8_kernel(t: GGMLType):
    return _q4_k_q8_kernel if t == GGMLType.Q4_K else _q6_k_q8_kernel


def supports(t: GGMLType, n_in: int, rows: int) -> bool:
    """Whether the kernel takes weights of type t, rows of n_in, and this many input rows."""
    return t in TYPES and n_in > 0 and n_in % 256 == 0 and 0 < rows <= MAX_INPUT_ROWS


def splits_for(n_out: int, n_in: int, rows_per_program: int = ROWS) -> int:
    """Runs of blocks a row's sum is split into: enough programs for the GPU's SMs where the
    rows alone make fewer than PROGRAMS, each walking at least MIN_SPLIT_BLOCKS blocks; rows
    of fewer than SPLIT_FROM_BLOCKS blocks whole."""
    n_blocks = n_in // 256
    if n_blocks < SPLIT_FROM_BLOCKS:
        return 1
    wanted = triton.cdiv(PROGRAMS, triton.cdiv(n_out, rows_per_program))
    return max(1, min(wanted, n_blocks // MIN_SPLIT_BLOCKS))


def kernel_for(t: GGMLType, n_in: int, rows: int = 1) -> str:
    """The kernel for type t's weights with rows of n_in times `rows` input rows:
    TANDEM_QUANT_MATVEC's, else q8 for up to Q8_MAX_INPUT_ROWS rows of at least
    Q8_FROM_BLOCKS[t] blocks, else values (run B's sweep, above)."""
    if KERNEL:
        return KERNEL
    return "q8" if rows <= Q8_MAX_INPUT_ROWS and n_in // 256 >= Q8_FROM_BLOCKS[t] else "values"


def matvec(raw: torch.Tensor, t: GGMLType, x: torch.Tensor, n_out: int,
           splits: int | None = None, kernel: str | None = None, rows_per_program: int | None = None,
           warps: int | None = None, stages: int | None = None) -> torch.Tensor:
    """x [M, K] float32 (M <= MAX_INPUT_ROWS) times the [n_out, K] weight stored as `raw`
    (uint8, type t) transposed: float32 [M, n_out]. `splits`: runs of blocks per row
    (default: splits_for; 1: none, for A/B runs). `kernel`: one of KERNELS (default:
    kernel_for's); `rows_per_program` (a power of two) and `warps` (default: Q8_TILES[t] for q8,
    ROWS and VALUES_WARPS for values) and `stages` (the loop's software pipelining; None:
    Triton's default) for sweeps (benchmarks/quant_matvec.py)."""
    kernel = kernel or kernel_for(t, x.shape[-1], x.shape[0])
    if kernel not in KERNELS:
        raise ValueError(f"matvec kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    tile_rows, tile_warps = Q8_TILES[t] if kernel == "q8" else (ROWS, VALUES_WARPS)
    rows_per_program, warps = rows_per_program or tile_rows, warps or tile_warps
    x = x.float().contiguous()
    m_rows, n_in = x.shape
    n_blocks = n_in // 256
    splits = min(splits or splits_for(n_out, n_in, rows_per_program), n_blocks)
    per_split = triton.cdiv(n_blocks, splits)
    splits = triton.cdiv(n_blocks, per_split)  # no empty runs
    y = torch.empty(splits, m_rows, n_out, dtype=torch.float32, device=x.device)
    size = block_bytes(t)
    padded = 1 << (m_rows - 1).bit_length()  # the accumulator's rows: a power of two
    grid = (triton.cdiv(n_out, rows_per_program), splits)
    args = (raw, x, y, n_out, n_blocks, per_split, n_blocks * size, n_in, m_rows)
    launch = {"num_warps": warps} | ({} if stages is None else {"num_stages": stages})
    if kernel == "values":
        _matvec_kernel[grid](*args, TYPE=TYPES[t], BLOCK=size, R=rows_per_program, M=padded, **launch)
    else:
        _q8_kernel(t)[grid](raw, *q8_activations(x), *args[2:], R=rows_per_program, M=padded,
                            INTERPRET=INTERPRET, **launch)
    return y[0] if splits == 1 else y.sum(0)

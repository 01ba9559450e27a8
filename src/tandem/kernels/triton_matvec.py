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
"""

from __future__ import annotations

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


@triton.jit
def f16_at(p):
    """The little-endian float16 at byte pointers p, as float32."""
    bits = tl.load(p).to(tl.int32) | (tl.load(p + 1).to(tl.int32) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def q4_k_values(blk):
    """Q4_K blocks at byte pointers blk [R] as float32 weights [R, 8, 32]: value 32 s + i of a
    block is nibble s % 2 of byte 32 (s // 2) + i of qs; sub-block s has a 6-bit scale and
    min packed in 12 bytes (ggml's get_scale_min_k4)."""
    s = tl.arange(0, 8)
    i = tl.arange(0, 32)
    low = s < 4
    at = blk[:, None] + 4
    a = tl.load(at + s[None, :]).to(tl.int32)  # scales[s]
    b = tl.load(at + s[None, :] + 4).to(tl.int32)  # scales[s + 4]
    c = tl.load(at + tl.where(low, s, s - 4)[None, :]).to(tl.int32)  # scales[s - 4] (s >= 4)
    sc = tl.where(low[None, :], a & 63, (b & 15) | ((c >> 6) << 4))
    m = tl.where(low[None, :], b & 63, (b >> 4) | ((a >> 6) << 4))
    scale = f16_at(blk)[:, None] * sc.to(tl.float32)  # [R, 8]
    minimum = f16_at(blk + 2)[:, None] * m.to(tl.float32)
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
def _matvec_kernel(w, x, y, n_out, n_blocks, per_split, row_bytes, n_in, m_rows, TYPE: tl.constexpr,
                   BLOCK: tl.constexpr, R: tl.constexpr, M: tl.constexpr):
    """y[k, m, r] = W[r] . x[m] over the k-th run of per_split blocks, for R rows r of this
    program and the m_rows (<= M) rows of x."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    split = tl.program_id(1)
    first = split * per_split
    inside = rows < n_out
    base = w + tl.where(inside, rows, 0).to(tl.int64) * row_bytes
    s = tl.arange(0, 8)
    i = tl.arange(0, 32)
    ms = tl.arange(0, M)
    total = tl.zeros([M, R], dtype=tl.float32)
    for b in range(first, tl.minimum(first + per_split, n_blocks)):
        blk = base + b * BLOCK
        if TYPE == 0:  # noqa: SIM108 (a statement Triton resolves at compile time)
            values = q4_k_values(blk)
        else:
            values = q6_k_values(blk)
        for m in range(m_rows):
            xb = tl.load(x + m * n_in + b * 256 + s[:, None] * 32 + i[None, :])  # [8, 32]
            part = tl.sum(tl.sum(values * xb[None, :, :], axis=2), axis=1)  # [R]
            total += tl.where(ms[:, None] == m, part[None, :], 0.0)
    out = y + split.to(tl.int64) * m_rows * n_out
    tl.store(out + ms[:, None] * n_out + rows[None, :], total, mask=(ms[:, None] < m_rows) & inside[None, :])


def supports(t: GGMLType, n_in: int, rows: int) -> bool:
    """Whether the kernel takes weights of type t, rows of n_in, and this many input rows."""
    return t in TYPES and n_in > 0 and n_in % 256 == 0 and 0 < rows <= MAX_INPUT_ROWS


def splits_for(n_out: int, n_in: int) -> int:
    """Runs of blocks a row's sum is split into: enough programs for the GPU's SMs where the
    rows alone make fewer than PROGRAMS, each walking at least MIN_SPLIT_BLOCKS blocks; rows
    of fewer than SPLIT_FROM_BLOCKS blocks whole."""
    n_blocks = n_in // 256
    if n_blocks < SPLIT_FROM_BLOCKS:
        return 1
    wanted = triton.cdiv(PROGRAMS, triton.cdiv(n_out, ROWS))
    return max(1, min(wanted, n_blocks // MIN_SPLIT_BLOCKS))


def matvec(raw: torch.Tensor, t: GGMLType, x: torch.Tensor, n_out: int,
           splits: int | None = None) -> torch.Tensor:
    """x [M, K] float32 (M <= MAX_INPUT_ROWS) times the [n_out, K] weight stored as `raw`
    (uint8, type t) transposed: float32 [M, n_out]. `splits`: runs of blocks per row
    (default: splits_for; 1: none, for A/B runs)."""
    x = x.float().contiguous()
    m_rows, n_in = x.shape
    n_blocks = n_in // 256
    splits = min(splits or splits_for(n_out, n_in), n_blocks)
    per_split = triton.cdiv(n_blocks, splits)
    splits = triton.cdiv(n_blocks, per_split)  # no empty runs
    y = torch.empty(splits, m_rows, n_out, dtype=torch.float32, device=x.device)
    size = block_bytes(t)
    padded = 1 << (m_rows - 1).bit_length()  # the accumulator's rows: a power of two
    _matvec_kernel[(triton.cdiv(n_out, ROWS), splits)](
        raw, x, y, n_out, n_blocks, per_split, n_blocks * size, n_in, m_rows,
        TYPE=TYPES[t], BLOCK=size, R=ROWS, M=padded)
    return y[0] if splits == 1 else y.sum(0)

"""Hand-written Triton kernels for the GPU share's experts (UD-IQ1_S: IQ1_S gate and up,
IQ2_XXS down; Q4_K_M: Q4_K gate and up, Q6_K down): an alternative to the torch.compile'd
decoders (kernels.gpu_share), which read the experts' bytes at ~100-250 GB/s on an H200 (run q
profiles), a few percent of its bandwidth, and so leave ~0.25 ms of kernels per MoE layer
after the last copy.

Each program takes R weight rows of one expert and walks their 256-weight blocks. IQ types:
per 8 weights one row of a small grid table (L1-resident: IQ1_S 4096 rows with the delta
folded in, 128 KB, torch_dequant's; IQ2_XXS 256 unsigned rows, 8 KB, its 7-bit sign fields
applied by bit tests), times the matching 8 activations, scaled per 32 weights; k-quants: the block decoded
into registers (kernels.triton_matvec). Float32 throughout, as the compiled path.

The kernels find each expert's bytes through a table of addresses (one per expert and
matrix), not as rows of one tensor: the same kernels read the share's device slots, rows of
an expert cache, or the pinned file mapping itself (`experts_at`: mapped host memory read
over PCIe by the kernels, no copies; gpu_share's TANDEM_SHARE_DIRECT). `experts` and
`expert_rows` keep gpu_share's signatures for `_experts` (one token) and `_expert_rows` (a
batch, each expert on one token's row); the grid arguments are ignored: these kernels read
their own tables. `fits` says which shapes they take. TANDEM_SHARE_TRITON=1 turns them on in
the share (A/B runs).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import quants

from tandem.gguf.types import GGMLType, block_bytes
from tandem.kernels import torch_dequant
from tandem.kernels.triton_matvec import f16_at, q4_k_values, q6_k_values

MIXES = {  # gate, up, down types -> the kernels' TYPE for gate/up and for down
    (GGMLType.IQ1_S, GGMLType.IQ1_S, GGMLType.IQ2_XXS): (0, 1),
    (GGMLType.Q4_K, GGMLType.Q4_K, GGMLType.Q6_K): (2, 3),
}
ROWS = 16  # weight rows per program, at most (shapes must come in whole tiles of it)
# ... by default per mix: run D's sweeps in VRAM (share_in_place, two machines) had the UD-IQ1_S
# mix fastest at 8 (2/4/6 experts 0.140/0.237/0.304 and 0.129/0.250/0.319 ms against
# 0.160/0.272/0.385 and 0.141/0.290/0.352 at 16), Q4_K_M at 16. Also tried in run D: IQ1_S and
# IQ2_XXS grid rows as 2-bit codes in one int32 (8 KB tables, unpacked by shifts) instead of 8
# floats (128 KB): 0.106 against 0.130 ms for 1 expert, but 0.167/0.301/0.368 against
# 0.129/0.250/0.319 for 2/4/6, so the float rows stay
DEFAULT_ROWS = {(GGMLType.IQ1_S, GGMLType.IQ1_S, GGMLType.IQ2_XXS): 8,
                (GGMLType.Q4_K, GGMLType.Q4_K, GGMLType.Q6_K): 16}
GATHER_WORDS = 4096  # int64 words a program of `gather` copies


@triton.jit
def _iq1_s_dots(blk, xb, table):
    """One IQ1_S block of R rows (byte pointers `blk` [R]) times its 256 activations xb [32, 8]:
    [R] float32. Group g (8 weights) of sub-block g // 4: grid row qs[g] | 3 high bits from
    qh[g // 4], + 2048 where the sub-block's delta is negative; scale d * (2 s + 1)."""
    g = tl.arange(0, 32)
    j = tl.arange(0, 8)
    qs = tl.load(blk[:, None] + 2 + g[None, :]).to(tl.int32)
    at = blk[:, None] + 34 + 2 * (g[None, :] // 4)
    qh = tl.load(at).to(tl.int32) | (tl.load(at + 1).to(tl.int32) << 8)
    index = qs | (((qh >> (3 * (g[None, :] % 4))) & 7) << 8)
    index += ((qh >> 15) & 1) * 2048
    scale = f16_at(blk)[:, None] * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)  # [R, 32]
    rows = tl.load(table + index[:, :, None] * 8 + j[None, None, :])  # [R, 32, 8]
    return tl.sum(scale * tl.sum(rows * xb[None, :, :], axis=2), axis=1)


@triton.jit
def _iq2_xxs_dots(blk, hb, grid, ksigns):
    """One IQ2_XXS block of R rows times its 256 activations hb [32, 8]: [R] float32. Per 32
    weights 4 grid bytes, then a word of four 7-bit sign fields and a 4-bit scale s:
    w = d (0.5 + s) / 4 * grid * sign."""
    g = tl.arange(0, 32)
    j = tl.arange(0, 8)
    word = blk[:, None] + 2 + 8 * (g[None, :] // 4)
    index = tl.load(word + g[None, :] % 4).to(tl.int32)  # [R, 32]
    meta = (tl.load(word + 4).to(tl.int64) | (tl.load(word + 5).to(tl.int64) << 8)
            | (tl.load(word + 6).to(tl.int64) << 16) | (tl.load(word + 7).to(tl.int64) << 24))
    signs = tl.load(ksigns + ((meta >> (7 * (g[None, :] % 4))) & 127))  # [R, 32], 8 bits
    scale = f16_at(blk)[:, None] * (0.5 + (meta >> 28).to(tl.float32)) * 0.25
    values = tl.load(grid + index[:, :, None] * 8 + j[None, None, :])  # [R, 32, 8]
    negative = (signs[:, :, None] >> j[None, None, :]) & 1
    values = tl.where(negative != 0, -values, values)
    return tl.sum(scale * tl.sum(values * hb[None, :, :], axis=2), axis=1)


@triton.jit
def _block_dots(TYPE: tl.constexpr, blk, v, table, grid, ksigns):
    """Blocks of type TYPE (0 IQ1_S, 1 IQ2_XXS, 2 Q4_K, 3 Q6_K) of R rows at byte pointers
    blk [R] times the 256 activations at v: [R] float32."""
    g = tl.arange(0, 32)
    j = tl.arange(0, 8)
    s = tl.arange(0, 8)
    i = tl.arange(0, 32)
    if TYPE == 0:
        dots = _iq1_s_dots(blk, tl.load(v + g[:, None] * 8 + j[None, :]), table)
    elif TYPE == 1:
        dots = _iq2_xxs_dots(blk, tl.load(v + g[:, None] * 8 + j[None, :]), grid, ksigns)
    else:
        vb = tl.load(v + s[:, None] * 32 + i[None, :])  # [8, 32]
        if TYPE == 2:  # noqa: SIM108 (a statement Triton resolves at compile time)
            values = q4_k_values(blk)
        else:
            values = q6_k_values(blk)
        dots = tl.sum(tl.sum(values * vb[None, :, :], axis=2), axis=1)
    return dots


@triton.jit
def _expert_at(addresses, e):
    """The byte pointer to pair e's expert: entry e of an int64 address table."""
    return tl.load(addresses + e).to(tl.pointer_type(tl.uint8))


@triton.jit
def _gate_up_kernel(gate_at, up_at, x, tokens, table, h, row_bytes, n_rows, n_blocks, d,
                    TYPE: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr, BATCH: tl.constexpr):
    """h[e, r] = silu(gate_e[r] . x_e) * (up_e[r] . x_e) for rows r of program (e, tile); x_e is
    x (one token) or, for a batch, row tokens[e] of x. gate_e and up_e at gate_at[e], up_at[e]."""
    e = tl.program_id(0)
    rows = tl.program_id(1) * R + tl.arange(0, R)
    offset = rows.to(tl.int64) * row_bytes
    gate = _expert_at(gate_at, e) + offset
    up = _expert_at(up_at, e) + offset
    if BATCH:
        x += tl.load(tokens + e) * d
    gate_sum = tl.zeros([R], dtype=tl.float32)
    up_sum = tl.zeros([R], dtype=tl.float32)
    for b in range(n_blocks):
        gate_sum += _block_dots(TYPE, gate + b * BLOCK, x + b * 256, table, table, table)
        up_sum += _block_dots(TYPE, up + b * BLOCK, x + b * 256, table, table, table)
    silu = gate_sum / (1.0 + tl.exp(-gate_sum))
    tl.store(h + e * n_rows + rows, silu * up_sum)


@triton.jit
def _down_kernel(down_at, h, weight, tokens, grid, ksigns, y, n_experts, row_bytes, n_blocks,
                 n_in, n_rows, TYPE: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr, T: tl.constexpr):
    """y[t, r] = sum of weight[e] * (down_e[r] . h[e]) over the experts e of token t (all of
    them when T is 1, else tokens[e]) for rows r of this program, down_e at down_at[e]; an
    expert of weight 0 (a padded pair, stale bytes) adds nothing."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    total = tl.zeros([T, R], dtype=tl.float32)
    for e in range(n_experts):
        down = _expert_at(down_at, e) + rows.to(tl.int64) * row_bytes
        acc = tl.zeros([R], dtype=tl.float32)
        for b in range(n_blocks):
            acc += _block_dots(TYPE, down + b * BLOCK, h + e * n_in + b * 256, grid, grid, ksigns)
        w = tl.load(weight + e)
        added = tl.where(w != 0, w * acc, 0.0)
        if T == 1:
            total += added[None, :]
        else:
            mine = tl.arange(0, T) == tl.load(tokens + e)
            total += tl.where(mine[:, None], added[None, :], 0.0)
    tl.store(y + tl.arange(0, T)[:, None] * n_rows + rows[None, :], total)


@functools.cache
def _iq2_xxs_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ2_XXS grid rows ([256, 8], unsigned: the signs come by bit tests) and its 128 sign
    bytes (7 bits + parity), on `device`. (IQ1_S reads torch_dequant's table: its rows with the
    delta folded in.)"""
    quants.IQ2_XXS.init_grid()
    grid = quants.IQ2_XXS.grid.reshape(quants.IQ2_XXS.grid_shape).astype(np.float32)
    ksigns = np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8).astype(np.int32)
    return torch.from_numpy(np.ascontiguousarray(grid)).to(device), torch.from_numpy(ksigns).to(device)


def addresses(raw: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
    """The address of each expert (a row of raw bytes [n, bytes]), or of the row each of
    `slots` names: int64 [n] on raw's device, as the kernels take them."""
    if slots is None:
        slots = torch.arange(raw.shape[0], device=raw.device)
    return slots.to(torch.int64) * raw.stride(0) + raw.data_ptr()


def gate_up_at(types: tuple[GGMLType, GGMLType, GGMLType], gate_at: torch.Tensor, up_at: torch.Tensor,
               expert_bytes: int, x: torch.Tensor, tokens: torch.Tensor | None = None,
               rows: int | None = None) -> torch.Tensor:
    """silu(gate_e x_e) * up_e x_e for the n experts of a mix in MIXES whose gate and up bytes
    (`expert_bytes` each, rows of d) lie at gate_at[e] and up_at[e] (int64 [n] addresses the
    device can read): x [d] for all, or x [T, d] and tokens [n] (int64): expert e on row
    tokens[e]. float32 [n, n_ff]. `rows`: weight rows per program (a power of two dividing
    n_ff and d, at most ROWS; more programs keep more loads in flight; default DEFAULT_ROWS)."""
    n, d, rows = gate_at.shape[0], x.shape[-1], rows or DEFAULT_ROWS[tuple(types)]
    size = block_bytes(types[0])
    row_bytes = d // 256 * size
    n_rows = expert_bytes // row_bytes
    h = torch.empty(n, n_rows, dtype=torch.float32, device=x.device)
    table = torch_dequant.grid_table(GGMLType.IQ1_S, x.device)  # [4096, 8]: +delta rows, then -delta
    batch = tokens is not None
    _gate_up_kernel[(n, n_rows // rows)](gate_at, up_at, x, tokens if batch else x, table, h,
                                        row_bytes, n_rows, d // 256, d,
                                        TYPE=MIXES[types][0], BLOCK=size, R=rows, BATCH=batch)
    return h


def down_at(types: tuple[GGMLType, GGMLType, GGMLType], at: torch.Tensor, expert_bytes: int, h: torch.Tensor,
            weight: torch.Tensor, tokens: torch.Tensor | None = None, n_tokens: int = 1,
            rows: int | None = None) -> torch.Tensor:
    """sum_e weight[e] * down_e h[e] for the n experts of a mix in MIXES whose down bytes
    (`expert_bytes` each, rows of h.shape[1]) lie at at[e], per token: [n_tokens, d]
    float32, expert e adding to row tokens[e] (all to row 0 without tokens). Experts of
    weight 0 add nothing, whatever their bytes. `rows`: as gate_up_at's."""
    (n, n_in), rows = h.shape, rows or DEFAULT_ROWS[tuple(types)]
    size = block_bytes(types[2])
    row_bytes = n_in // 256 * size
    n_rows = expert_bytes // row_bytes
    y = torch.empty(n_tokens, n_rows, dtype=torch.float32, device=h.device)
    grid, ksigns = _iq2_xxs_tables(h.device)
    _down_kernel[(n_rows // rows,)](at, h, weight.float().contiguous(),
                                   tokens if tokens is not None else weight, grid, ksigns, y, n,
                                   row_bytes, n_in // 256, n_in, n_rows,
                                   TYPE=MIXES[types][1], BLOCK=size, R=rows, T=n_tokens)
    return y


def experts_at(types: tuple[GGMLType, GGMLType, GGMLType], at: torch.Tensor, sizes: tuple[int, int, int],
               x: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor | None = None,
               n_tokens: int = 1, rows: int | None = None) -> torch.Tensor:
    """n (expert, token) pairs whose gate, up and down bytes (sizes[m] each) lie at at[m, i]
    (int64 [3, n]): sum_i weight[i] * down_i(silu(gate_i x_i) * up_i x_i) per token,
    [n_tokens, d] float32; x [d] for all pairs, or rows [n_tokens, d] with tokens [n]."""
    h = gate_up_at(types, at[0], at[1], sizes[0], x.float().contiguous(), tokens, rows)
    return down_at(types, at[2], sizes[2], h, weight, tokens, n_tokens, rows)


@triton.jit
def _gather_kernel(at, words, n_words, expert_words, first_word, BLOCK: tl.constexpr):
    """Words [chunk * BLOCK, ...) of expert i's matrix at at[i] into words[i * expert_words +
    first_word + ...]: plain coalesced loads, many in flight (what PCIe reads need)."""
    i = tl.program_id(1)
    src = tl.load(at + i).to(tl.pointer_type(tl.int64))
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n_words
    tl.store(words + i * expert_words + first_word + idx, tl.load(src + idx, mask=inside), mask=inside)


def gather(at: torch.Tensor, sizes: tuple[int, int, int], scratch: torch.Tensor) -> torch.Tensor:
    """Copy n experts' gate, up and down bytes (at [3, n] int64 addresses, sizes[m] bytes each,
    multiples of 8 at 8-byte aligned addresses) into `scratch` (uint8 on the device, at least
    n * sum(sizes) bytes), each expert's three back to back: their addresses there, [3, n]."""
    n, per = at.shape[1], sum(sizes)
    if any(size % 8 for size in sizes) or scratch.numel() < n * per or scratch.data_ptr() % 8:
        raise ValueError(f"gather takes whole int64 words into a large enough scratch: sizes {sizes}, "
                         f"{n} experts, {scratch.numel()} bytes of scratch")
    words, first = scratch[: n * per].view(torch.int64), 0
    for m, size in enumerate(sizes):
        grid = (triton.cdiv(size // 8, GATHER_WORDS), n)
        _gather_kernel[grid](at[m].contiguous(), words, size // 8, per // 8, first // 8, BLOCK=GATHER_WORDS)
        first += size
    starts = torch.arange(n, device=scratch.device, dtype=torch.int64) * per + scratch.data_ptr()
    return torch.stack([starts + sum(sizes[:m]) for m in range(3)])


def gate_up(types: tuple[GGMLType, GGMLType, GGMLType], gate_raw: torch.Tensor, up_raw: torch.Tensor,
            x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up_at for the experts in the rows of gate_raw and up_raw ([n, bytes] each)."""
    return gate_up_at(types, addresses(gate_raw), addresses(up_raw), gate_raw.shape[1], x, tokens)


def down(types: tuple[GGMLType, GGMLType, GGMLType], down_raw: torch.Tensor, h: torch.Tensor,
         weight: torch.Tensor, tokens: torch.Tensor | None = None, n_tokens: int = 1) -> torch.Tensor:
    """down_at for the experts in the rows of down_raw [n, bytes]."""
    return down_at(types, addresses(down_raw), down_raw.shape[1], h, weight, tokens, n_tokens)


def experts(types: tuple[GGMLType, GGMLType, GGMLType], gate_raw: torch.Tensor, up_raw: torch.Tensor,
            down_raw: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *grids) -> torch.Tensor:
    """gpu_share._experts: sum_e weight_e * down_e(silu(gate_e x) * up_e x), [d]."""
    h = gate_up(types, gate_raw, up_raw, x.float().contiguous())
    return down(types, down_raw, h, weight)[0]


def expert_rows(types: tuple[GGMLType, GGMLType, GGMLType], gate_raw: torch.Tensor, up_raw: torch.Tensor,
                down_raw: torch.Tensor, x_rows: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor,
                weight: torch.Tensor, *grids) -> torch.Tensor:
    """gpu_share._expert_rows: the expert in row slots[i] on row tokens[i] of x_rows [T, d]
    with weight weight[i], summed per row: [T, d] (T a power of two: MAX_TOKENS). The kernels
    read each pair's expert in its row (addresses from the slots: no gather copy)."""
    at = torch.stack([addresses(raw, slots) for raw in (gate_raw, up_raw, down_raw)])
    sizes = (gate_raw.shape[1], up_raw.shape[1], down_raw.shape[1])
    return experts_at(types, at, sizes, x_rows, weight, tokens.contiguous(), x_rows.shape[0])


def fits(types: tuple[GGMLType, GGMLType, GGMLType], gate_raw: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether experts of these types with these gate bytes [n, bytes] and x [d] (or rows
    [T, d], T a power of two) come in whole tiles (`fits_sizes`)."""
    return fits_sizes(types, gate_raw.shape[1], x.shape[-1], x.shape[0] if x.dim() == 2 else 1)


def fits_sizes(types: tuple[GGMLType, GGMLType, GGMLType], gate_bytes: int, d: int, rows: int = 1) -> bool:
    """Whether experts of these types, `gate_bytes` of gate each, on `rows` vectors of d
    (a power of two of them) come in whole tiles: a mix in MIXES, rows of whole blocks, ROWS
    rows at a time, both ways (R1: d 7168, n_ff 2048)."""
    if tuple(types) not in MIXES:
        return False
    row_bytes = d // 256 * block_bytes(types[0])
    if d % 256 or d % ROWS or not row_bytes or gate_bytes % row_bytes or rows & (rows - 1):
        return False
    n_ff = gate_bytes // row_bytes
    return n_ff % 256 == 0 and n_ff % ROWS == 0

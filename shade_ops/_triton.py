"""Triton kernels of the SHADE penalty: the CUDA implementation of the ``shade_ops`` ops.

The same launchers serve two dispatch entries:
- CUDA tensors: they are registered as the CUDA kernels of the ops that ``csrc/shade_ops.cpp``
  declares (``shade_ops::penalty_forward`` and friends), so there is one op definition, with its
  fake and autograd registrations in ``_registry.py``;
- CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them): as the CPU kernels of the opaque
  ops ``shade_ops::triton_*``, since the interpreter runs Triton on CPU tensors but the CPU
  dispatch entry of the native ops belongs to the C++ kernels.

y arrives as the ``(A, C, B)`` view of ``_layout.units_view``, with any strides, or as a contiguous
``(A, C, ...)`` whose trailing dims are merged here (``_layout.op_input``). The forward is one
launch: one pass over y that writes per-program partial sums, which the last program of each group
to finish (an integer atomic counter) adds in a fixed order; no floating-point atomics, so results
are bitwise reproducible. How the work is cut depends only on the shape and the device's SM count.
Nothing here reads a value back to the host, and every kernel runs under its tensors' device, on
that device's current stream, so a training step that uses them can be captured in a CUDA graph.
Design notes and compile figures: docs/triton.md.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import struct

import torch
import triton
import triton.language as tl

from . import _registry
from ._layout import accumulation_dtype

__all__ = ["penalty_forward", "relu_penalty_forward", "penalty_backward", "update_state",
           "CUDA_OPS", "CUDA_UNAVAILABLE", "INTERPRETER_OPS", "INTERPRETER_UNAVAILABLE"]

# triton.jit picks the interpreter when the kernels are defined: later changes to the variable do
# not reach them.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# ---- how the work is cut ----------------------------------------------------------------

_TILE = 2048            # elements of y one program handles per step of its loop
_NUM_WARPS = 8
_FWD_PER_SM = 2         # forward programs per SM on large inputs: one full wave, two programs
                        # of 8 warps and 79-106 registers a thread fit an SM (docs/triton.md)
_MIN_WORK = 4096        # elements of y per forward program, at least, where the input allows
_PARTIAL_ROWS = 32      # column layout: rows summed inside a program per partial written, at least
_BWD_PER_SM = 16        # the backward has no partials: more, smaller programs even out the waves
_BWD_MIN_WORK = 2048
_NUM_STAGES = 3         # software pipelining of the forward's loops: loads of later steps in flight
_STAND_IN_SMS = 132     # the SM count the cut assumes on CPU tensors (the interpreter): an H100's


def _pow2(n: int) -> int:
    return 1 << (max(1, int(n)) - 1).bit_length()


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _round_up(n: int, multiple: int) -> int:
    return _cdiv(n, multiple) * multiple


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (a fixed stand-in for CPU tensors): with the shape, all the cut
    depends on, so a result is bitwise reproducible on one device."""
    if device.type != "cuda":
        return _STAND_IN_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _column_tile(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_COL) for a (rows, cols) walk with cols innermost: at least a warp-wide row
    of columns, more when there are few rows."""
    block_col = min(_pow2(cols), max(128, _TILE // _pow2(rows)))
    return max(1, min(_TILE // block_col, _pow2(rows))), block_col


def _unit_column_tile(rows: int, C: int, B: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_COL, units per block) for the forward's column walk: blocks of whole units
    (B < 128 columns each), so that the last program of a block can finish its units. Of the
    widths from 128 (a warp of 4-element vectors) to 512 (or more with few rows), the one whose
    lanes are most used; units per block rounded down to keep each block's first column aligned
    to 8 elements (vector loads) where that costs at most a sixteenth of the lanes."""
    widest = max(min(_pow2(C * B), max(512, _TILE // _pow2(rows))), _pow2(B))
    step = 8 // math.gcd(B, 8)
    best = None
    block_col = widest
    while block_col >= min(128, widest):  # the widest of those that use their lanes best
        units = min(block_col // B, C)
        if units > step and units % step and (units - units % step) * B * 16 >= block_col * 15:
            units -= units % step
        used = units * B / block_col
        if best is None or used > best[0]:
            best = (used, block_col, units)
        block_col //= 2
    _, block_col, units = best
    return max(1, min(_TILE // block_col, _pow2(rows))), block_col, units


def _run_tile(rows: int, run: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_COL) for the runs of one unit: (rows, run) samples, run contiguous. The
    column block wastes at most a sixteenth of the run where a power of two allows."""
    if run < 128:
        block_col = _pow2(run)
    else:
        widest = min(_TILE, max(128, _TILE // _pow2(rows)))
        candidates = [c for c in (2048, 1024, 512, 256, 128) if c <= widest]
        padded = {c: _round_up(run, c) for c in candidates}
        fitting = [c for c in candidates if padded[c] - run <= run // 16]
        block_col = fitting[0] if fitting else min(candidates, key=lambda c: (padded[c], -c))
    return max(1, min(_TILE // block_col, _pow2(rows))), block_col


def _row_chunks(rows: int, block_r: int, col_blocks: int, numel: int, programs: int,
                min_work: int, min_rows: int = 1) -> tuple[int, int]:
    """(rows per chunk, chunks): about `programs` programs in all, each with `min_work` elements
    and `min_rows` rows at least, where the input allows."""
    wanted = _cdiv(programs, col_blocks)
    wanted = min(wanted, max(1, numel // (min_work * col_blocks)), max(1, rows // min_rows))
    per_chunk = _round_up(_cdiv(rows, max(1, wanted)), block_r)
    return per_chunk, _cdiv(rows, per_chunk)


def _run_pieces(A: int, B: int, C: int, block_r: int, block_col: int,
                programs: int) -> tuple[int, int, int, int]:
    """How each unit's (A, B) samples split into pieces for the runs kernel, about `programs`
    pieces in all: (rows_per_piece, cols_per_piece, row_pieces, col_pieces)."""
    wanted = max(1, min(_cdiv(programs, C), (A * B) // _MIN_WORK))
    row_blocks = _cdiv(A, block_r)
    if wanted <= row_blocks:
        rows_per_piece = _round_up(_cdiv(A, wanted), block_r)
        return rows_per_piece, B, _cdiv(A, rows_per_piece), 1
    col_pieces = min(_cdiv(B, block_col), _cdiv(wanted, row_blocks))
    cols_per_piece = _round_up(_cdiv(B, col_pieces), block_col)
    return block_r, cols_per_piece, row_blocks, _cdiv(B, cols_per_piece)


def _uses_columns(A: int, B: int) -> bool:
    """Forward layout: units innermost or runs under 32 elements (128 bytes) walk (A, C*B) with
    whole units along the vector; longer runs are walked unit by unit, a run along the vector.
    (Short runs walked unit by unit would give each unit a program, of a few elements for
    (5, 100000, 3); the column walk writes partials per column, 4 per 32 rows at most, which
    longer runs need not pay.)"""
    return B < 32


def _alignment(*values: int) -> int:
    """The largest power of two up to 16 that divides every value: offsets Triton may assume
    aligned, for vector loads where the arguments alone do not show it."""
    align = 16
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---- kernels ----------------------------------------------------------------------------

@triton.jit
def _probabilities(y):
    """(s, q) = (1 - exp(-relu(y)), exp(-relu(y))) of SPEC section 2, y in the accumulation dtype
    (a NaN y gives NaN s and q, as relu and exp do in the reference: relu is a where that keeps
    NaN, as tl.maximum does in the interpreter but not compiled for a GPU). Both keep a
    relative accuracy: q = exp(-r) for any r, and s where r is tiny too, where 1 - q would not
    (a 3% error at r = 1e-6, and s (y - mu1)^2 is most of the penalty there when mu1 is far):
    below 1/4, s is a Taylor polynomial of -expm1(-r), of degree 6 in float32 (within 5.3e-8)
    and 12 in float64 (within 1.2e-17), as the CPU kernels' scalar and float64 code computes it."""
    r = tl.where(y < 0, 0.0, y)
    q = tl.exp(-r)
    if y.dtype == tl.float64:
        p = r * (-1.0 / 479001600) + 1.0 / 39916800
        p = p * r - 1.0 / 3628800
        p = p * r + 1.0 / 362880
        p = p * r - 1.0 / 40320
        p = p * r + 1.0 / 5040
        p = p * r - 1.0 / 720
        p = p * r + 1.0 / 120
    else:
        p = r * (-1.0 / 720) + 1.0 / 120
    p = p * r - 1.0 / 24
    p = p * r + 1.0 / 6
    p = p * r - 0.5
    p = p * r + 1.0
    return tl.where(r < 0.25, p * r, 1.0 - q), q


@triton.jit
def _div(x, y):
    # x / y rounded to nearest, as in the interpreter and the reference: compiled, a float32 "/"
    # is an approximate division (div.full.f32, 2 ulp); float64 division is exact either way.
    if x.dtype == tl.float32:
        return tl.math.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _cast_to(x, DTYPE: tl.constexpr):
    # x rounded to DTYPE, to nearest even, alike on a GPU and in the interpreter (whose float32 to
    # bfloat16 conversion truncates): bfloat16 by hand from the float32 bits, NaN kept NaN.
    if DTYPE == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _penalty_terms(y, mu0, mu1, s, q):
    # s (y - mu1)^2 + q (y - mu0)^2 as it reads: two non-negative terms, whose sum never cancels
    # however far apart mu0 and mu1 are. Each probability multiplies its distance before the
    # distance squares it, as in the reference: where a square overflows and its probability is 0
    # (s at y = -1e30, q at y = 1e30) the term is 0, not 0 * inf = NaN.
    d1 = y - mu1
    d0 = y - mu0
    return (s * d1) * d1 + (q * d0) * d0


@triton.jit
def _penalty_gradient(y, mu0, mu1, mid, w_gap, two_w):
    # w (s'(y) (d1^2 - d0^2) + 2 (s d1 + q d0)) of SPEC section 3, s'(y) = q where y > 0, with
    # d1^2 - d0^2 = 2 (mu0 - mu1) (y - mid), mid = (mu0 + mu1) / 2: a product, which does not
    # cancel, and y - mid is one rounding from the exact value (d1 + d0 in its place lost accuracy
    # in proportion to |mu|). w_gap = 2 w (mu0 - mu1), two_w = 2 w. The probability multiplies the
    # weight before the distance, and s d1 + q d0 is a convex combination of the distances, so a
    # probability of 0 times a finite distance is 0: the gradient is finite wherever the exact one
    # is (y = 1e30 included), as in the reference.
    s, q = _probabilities(y)
    squares = tl.where(y > 0, (q * w_gap) * (y - mid), 0.0)
    return squares + two_w * (s * (y - mu1) + q * (y - mu0))


@triton.jit
def _penalty_fwd_columns_kernel(
        y_ptr, mu_ptr, out_ptr, partial_ptr, sums_ptr, penalty_ptr, group_ptr, mu_copy_ptr,
        counter_ptr, group_offset,
        A, NCOL, C, B, count, stride_a, stride_c, stride_b, stride_mu_z, stride_mu_c,
        rows_per_chunk, chunks, col_blocks, cols_per_block, units_per_block, partial_stride_j,
        FLAT: tl.constexpr, HAS_RELU: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr,
        ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_COL: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_G: tl.constexpr):
    # One program: a block of columns j = c * B + b of the (A, C * B) walk, whole units of it
    # (units_per_block of them), over one chunk of rows; it writes the four column sums of that
    # chunk to partial[:, chunk, j]. The last of a block's programs to finish adds them up.
    pid = tl.program_id(0).to(tl.int64)
    chunk = pid // col_blocks
    block = pid % col_blocks
    lanes = tl.arange(0, BLOCK_COL)
    if ALIGN > 1:  # what Triton cannot see from the arguments, for vector loads
        NCOL = tl.multiple_of(NCOL, ALIGN)
        cols_per_block = tl.multiple_of(cols_per_block, ALIGN)
    cols = block * cols_per_block + lanes
    col_mask = (lanes < cols_per_block) & (cols < NCOL)
    unit = cols // B
    if FLAT:  # (C, B) merge into one stride: keep the columns visibly contiguous
        col_off = cols * stride_b
    else:
        col_off = unit * stride_c + (cols - unit * B) * stride_b
    mu0 = tl.load(mu_ptr + unit * stride_mu_c, mask=col_mask, other=0).to(ACC)[None, :]
    mu1 = tl.load(mu_ptr + stride_mu_z + unit * stride_mu_c, mask=col_mask,
                  other=0).to(ACC)[None, :]

    acc_s = tl.zeros([BLOCK_R, BLOCK_COL], dtype=ACC)
    acc_sy = tl.zeros([BLOCK_R, BLOCK_COL], dtype=ACC)
    acc_qy = tl.zeros([BLOCK_R, BLOCK_COL], dtype=ACC)
    acc_pen = tl.zeros([BLOCK_R, BLOCK_COL], dtype=ACC)
    row_start = chunk * rows_per_chunk
    row_end = tl.minimum(row_start + rows_per_chunk, A)
    for r in tl.range(row_start, row_end, BLOCK_R, num_stages=NUM_STAGES):
        rows = r + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        row_off = rows * stride_a
        if ALIGN > 1:
            row_off = tl.multiple_of(row_off, ALIGN)
        raw = tl.load(y_ptr + row_off[:, None] + col_off[None, :], mask=mask, other=0)
        y = raw.to(ACC)
        s, q = _probabilities(y)  # a masked y = 0 gives s = 0
        acc_s += s
        acc_sy += s * y
        acc_qy += q * y
        acc_pen += tl.where(mask, _penalty_terms(y, mu0, mu1, s, q), 0.0)
        if HAS_RELU:  # y < 0 ? 0 : y keeps NaN, as torch.relu does
            out_off = rows * NCOL
            if ALIGN > 1:
                out_off = tl.multiple_of(out_off, ALIGN)
            tl.store(out_ptr + out_off[:, None] + cols[None, :],
                     tl.where(raw < 0, 0.0, raw).to(out_ptr.dtype.element_ty), mask=mask)

    partial = partial_ptr + chunk * NCOL + cols
    tl.store(partial, tl.sum(acc_s, axis=0), mask=col_mask)
    tl.store(partial + partial_stride_j, tl.sum(acc_sy, axis=0), mask=col_mask)
    tl.store(partial + 2 * partial_stride_j, tl.sum(acc_qy, axis=0), mask=col_mask)
    tl.store(partial + 3 * partial_stride_j, tl.sum(acc_pen, axis=0), mask=col_mask)
    # unit c: entries (chunk, b) at c * B + chunk * NCOL + b
    first = block * units_per_block
    _finish_group(block, col_blocks, chunks, first, tl.minimum(first + units_per_block, C),
                  partial_ptr, sums_ptr, penalty_ptr, group_ptr + group_offset, mu_ptr,
                  mu_copy_ptr, counter_ptr, C, count, chunks * B, B, B, NCOL, partial_stride_j, stride_mu_z, stride_mu_c,
                  MEAN=MEAN, ACC=ACC, BLOCK_U=BLOCK_U, BLOCK_P=BLOCK_P, BLOCK_G=BLOCK_G)


@triton.jit
def _penalty_fwd_runs_kernel(
        y_ptr, mu_ptr, out_ptr, partial_ptr, sums_ptr, penalty_ptr, group_ptr, mu_copy_ptr,
        counter_ptr, group_offset,
        A, C, B, count, stride_a, stride_c, stride_b, stride_mu_z, stride_mu_c,
        rows_per_piece, cols_per_piece, col_pieces, pieces,
        HAS_RELU: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr,
        NUM_STAGES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr):
    # One program: one piece (rows x run columns) of one unit; it writes the unit's four sums over
    # that piece to partial[:, unit, piece]. The last of a unit's programs to finish adds them up.
    pid = tl.program_id(0).to(tl.int64)
    unit = pid // pieces
    piece = pid % pieces
    row_start = (piece // col_pieces) * rows_per_piece
    row_end = tl.minimum(row_start + rows_per_piece, A)
    col_start = (piece % col_pieces) * cols_per_piece
    col_end = tl.minimum(col_start + cols_per_piece, B)
    unit_off = unit * stride_c
    if ALIGN > 1:  # what Triton cannot see from the arguments, for vector loads
        col_end = tl.multiple_of(col_end, ALIGN)
        unit_off = tl.multiple_of(unit_off, ALIGN)
    mu0 = tl.load(mu_ptr + unit * stride_mu_c).to(ACC)
    mu1 = tl.load(mu_ptr + stride_mu_z + unit * stride_mu_c).to(ACC)
    y_unit = y_ptr + unit_off

    acc_s = tl.zeros([BLOCK_R, BLOCK_COL], dtype=ACC)
    acc_sy = tl.zeros([BLOCK_R, BLOCK_COL], dtype=ACC)
    acc_qy = tl.zeros([BLOCK_R, BLOCK_COL], dtype=ACC)
    acc_pen = tl.zeros([BLOCK_R, BLOCK_COL], dtype=ACC)
    # one loop over the piece's (row block, column block) tiles, so that the pipelining reaches
    # across rows when a run is one or two column blocks long (as for 8x8 or 14x14 maps)
    col_tiles = tl.cdiv(col_end - col_start, BLOCK_COL)
    tiles = tl.cdiv(row_end - row_start, BLOCK_R) * col_tiles
    for t in tl.range(0, tiles, num_stages=NUM_STAGES):
        rows = row_start + (t // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = (rows < row_end)[:, None]
        row_off = rows * stride_a
        if ALIGN > 1:
            row_off = tl.multiple_of(row_off, ALIGN)
        cols = col_start + (t % col_tiles) * BLOCK_COL + tl.arange(0, BLOCK_COL)
        mask = row_mask & (cols < col_end)[None, :]
        raw = tl.load(y_unit + row_off[:, None] + cols[None, :] * stride_b, mask=mask, other=0)
        y = raw.to(ACC)
        s, q = _probabilities(y)
        acc_s += s
        acc_sy += s * y
        acc_qy += q * y
        acc_pen += tl.where(mask, _penalty_terms(y, mu0, mu1, s, q), 0.0)
        if HAS_RELU:
            out_off = (rows * C + unit) * B
            if ALIGN > 1:
                out_off = tl.multiple_of(out_off, ALIGN)
            tl.store(out_ptr + out_off[:, None] + cols[None, :],
                     tl.where(raw < 0, 0.0, raw).to(out_ptr.dtype.element_ty), mask=mask)

    partial = partial_ptr + unit * pieces + piece
    partial_stride_j = C * pieces
    tl.store(partial, tl.sum(acc_s))
    tl.store(partial + partial_stride_j, tl.sum(acc_sy))
    tl.store(partial + 2 * partial_stride_j, tl.sum(acc_qy))
    tl.store(partial + 3 * partial_stride_j, tl.sum(acc_pen))
    _finish_group(unit, C, pieces, unit, unit + 1, partial_ptr, sums_ptr, penalty_ptr,
                  group_ptr + group_offset, mu_ptr, mu_copy_ptr, counter_ptr, C, count, pieces, pieces, pieces, 0,
                  partial_stride_j, stride_mu_z, stride_mu_c,
                  MEAN=MEAN, ACC=ACC, BLOCK_U=1, BLOCK_P=BLOCK_P, BLOCK_G=BLOCK_G)


@triton.jit
def _finish_group(group, groups, group_size, first_unit, end_unit, partial_ptr, sums_ptr,
                  penalty_ptr, group_ptr, mu_ptr, mu_copy_ptr, counter_ptr, C, count, P, P_INNER,
                  partial_stride_c, partial_stride_outer, partial_stride_j, stride_mu_z,
                  stride_mu_c, MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_U: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr):
    # The end of every forward program, once its partials are stored. A group is the programs
    # whose partials cover units [first_unit, end_unit): the last of them to finish (an integer
    # atomic counter per group) adds the group's partials, entry i < P of unit c at
    # c * partial_stride_c + (i // P_INNER) * partial_stride_outer + i % P_INNER, into the units'
    # sums and penalty; the last group to finish adds the group penalties into the penalty. Each
    # addition runs in a fixed order whichever program does it, so results are bitwise
    # reproducible; each counter is set back to 0 by its last reader, ready for the next launch
    # on the stream, with no memset and no host work.
    tl.debug_barrier()  # every thread's partials are stored before the counter says so
    ticket = tl.atomic_add(counter_ptr + group, 1, sem="acq_rel", scope="gpu")
    if ticket == group_size - 1:
        tl.store(counter_ptr + group, 0)
        units = (first_unit + tl.arange(0, BLOCK_U)).to(tl.int64)
        unit_mask = units < end_unit
        mu_units = mu_ptr + units * stride_mu_c  # mu as the forward read it, kept for autograd
        tl.store(mu_copy_ptr + units, tl.load(mu_units, mask=unit_mask), mask=unit_mask)
        tl.store(mu_copy_ptr + C + units, tl.load(mu_units + stride_mu_z, mask=unit_mask),
                 mask=unit_mask)
        acc_s = tl.zeros([BLOCK_U, BLOCK_P], dtype=ACC)
        acc_sy = tl.zeros([BLOCK_U, BLOCK_P], dtype=ACC)
        acc_qy = tl.zeros([BLOCK_U, BLOCK_P], dtype=ACC)
        acc_pen = tl.zeros([BLOCK_U, BLOCK_P], dtype=ACC)
        for p0 in range(0, P, BLOCK_P):
            i = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
            offsets = units[:, None] * partial_stride_c \
                + ((i // P_INNER) * partial_stride_outer + i % P_INNER)[None, :]
            mask = unit_mask[:, None] & (i < P)[None, :]
            # .cg: from L2, where the other programs' partials are, never a stale L1 line
            acc_s += tl.load(partial_ptr + offsets, mask=mask, other=0, cache_modifier=".cg")
            acc_sy += tl.load(partial_ptr + partial_stride_j + offsets, mask=mask, other=0,
                              cache_modifier=".cg")
            acc_qy += tl.load(partial_ptr + 2 * partial_stride_j + offsets, mask=mask, other=0,
                              cache_modifier=".cg")
            acc_pen += tl.load(partial_ptr + 3 * partial_stride_j + offsets, mask=mask, other=0,
                               cache_modifier=".cg")
        k = tl.cast(count, ACC)
        tl.store(sums_ptr + units, tl.sum(acc_s, axis=1), mask=unit_mask)
        tl.store(sums_ptr + C + units, tl.sum(acc_sy, axis=1), mask=unit_mask)
        tl.store(sums_ptr + 2 * C + units, tl.sum(acc_qy, axis=1), mask=unit_mask)
        tl.store(sums_ptr + 3 * C + units, tl.zeros([BLOCK_U], dtype=ACC) + k, mask=unit_mask)
        unit_penalty = tl.sum(acc_pen, axis=1)
        if MEAN:
            unit_penalty = _div(unit_penalty, k)
        tl.store(group_ptr + group, tl.sum(tl.where(unit_mask, unit_penalty, 0.0)))
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr + groups, 1, sem="acq_rel", scope="gpu")
        if done == groups - 1:
            tl.store(counter_ptr + groups, 0)
            acc = tl.zeros([BLOCK_G], dtype=ACC)
            for g0 in range(0, groups, BLOCK_G):
                g = g0 + tl.arange(0, BLOCK_G)
                acc += tl.load(group_ptr + g, mask=g < groups, other=0, cache_modifier=".cg")
            tl.store(penalty_ptr, tl.sum(acc))


@triton.jit
def _penalty_bwd_kernel(
        grad_penalty_ptr, y_ptr, mu_ptr, grad_out_ptr, grad_ptr,
        A, NCOL, B, count, stride_a, stride_c, stride_b, stride_mu_z, stride_mu_c,
        go_stride_a, go_stride_c, go_stride_b, rows_per_chunk, col_blocks,
        FLAT: tl.constexpr, GO_FLAT: tl.constexpr, MEAN: tl.constexpr,
        HAS_GRAD_OUT: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr):
    # One program: a block of columns j = c * B + b over one chunk of rows of the (A, C * B) walk.
    pid = tl.program_id(0).to(tl.int64)
    chunk = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK_COL + tl.arange(0, BLOCK_COL)
    if ALIGN > 1:
        NCOL = tl.multiple_of(NCOL, ALIGN)
    col_mask = cols < NCOL
    unit = cols // B
    if FLAT:
        col_off = cols * stride_b
    else:
        col_off = unit * stride_c + (cols - unit * B) * stride_b
    if GO_FLAT:
        go_col_off = cols * go_stride_b
    else:
        go_col_off = unit * go_stride_c + (cols - unit * B) * go_stride_b
    w = tl.load(grad_penalty_ptr).to(ACC)  # read on the device: no host synchronisation
    if MEAN:
        w = _div(w, tl.cast(count, ACC))
    mu0 = tl.load(mu_ptr + unit * stride_mu_c, mask=col_mask, other=0).to(ACC)[None, :]
    mu1 = tl.load(mu_ptr + stride_mu_z + unit * stride_mu_c, mask=col_mask,
                  other=0).to(ACC)[None, :]
    # per unit: the midpoint and 2 w (mu0 - mu1); a sum or difference of two ACC values is the
    # exact one rounded once, and the halving is exact
    mid = (mu0 + mu1) * 0.5
    two_w = 2 * w
    w_gap = two_w * (mu0 - mu1)

    row_start = chunk * rows_per_chunk
    row_end = tl.minimum(row_start + rows_per_chunk, A)
    for r in range(row_start, row_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        row_off = rows * stride_a
        out_off = rows * NCOL
        if ALIGN > 1:
            row_off = tl.multiple_of(row_off, ALIGN)
            out_off = tl.multiple_of(out_off, ALIGN)
        y = tl.load(y_ptr + row_off[:, None] + col_off[None, :], mask=mask, other=0).to(ACC)
        grad = _penalty_gradient(y, mu0, mu1, mid, w_gap, two_w)
        if HAS_GRAD_OUT:  # the fused ShadeReLU: + grad_out * relu'(y)
            go_row_off = rows * go_stride_a
            if ALIGN > 1:
                go_row_off = tl.multiple_of(go_row_off, ALIGN)
            go = tl.load(grad_out_ptr + go_row_off[:, None] + go_col_off[None, :], mask=mask,
                         other=0).to(ACC)
            grad += tl.where(y > 0, go, 0.0)
        tl.store(grad_ptr + out_off[:, None] + cols[None, :],
                 _cast_to(grad, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_state_kernel(
        p_ptr, mu_ptr, sums_ptr, C, stride_p_z, stride_p_c, stride_mu_z, stride_mu_c,
        stride_s_j, stride_s_c, decay_hi, decay_lo, keep_hi, keep_lo,
        COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    # Algorithm 1 with the guards of SPEC section 4. keep = 1 - decay, computed in double; both
    # arrive as float32 pairs hi + lo (hi the float32 rounding), since Triton passes Python floats
    # as float32 and float64 state needs the double value.
    units = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = units < C
    sums = sums_ptr + units * stride_s_c
    count = tl.load(sums + 3 * stride_s_j, mask=mask, other=1).to(COMPUTE)
    b1 = _div(tl.load(sums, mask=mask, other=0).to(COMPUTE), count)
    m1 = _div(tl.load(sums + stride_s_j, mask=mask, other=0).to(COMPUTE), count)
    m0 = _div(tl.load(sums + 2 * stride_s_j, mask=mask, other=0).to(COMPUTE), count)
    b0 = 1 - b1
    p0_ptr = p_ptr + units * stride_p_c
    mu0_ptr = mu_ptr + units * stride_mu_c
    p0 = tl.load(p0_ptr, mask=mask, other=1).to(COMPUTE)
    p1 = tl.load(p0_ptr + stride_p_z, mask=mask, other=1).to(COMPUTE)
    mu0 = tl.load(mu0_ptr, mask=mask, other=0).to(COMPUTE)
    mu1 = tl.load(mu0_ptr + stride_mu_z, mask=mask, other=0).to(COMPUTE)
    d = tl.cast(decay_hi, COMPUTE) + tl.cast(decay_lo, COMPUTE)
    k = tl.cast(keep_hi, COMPUTE) + tl.cast(keep_lo, COMPUTE)
    new_p0 = d * p0 + k * b0
    new_p1 = d * p1 + k * b1
    new_mu0 = tl.where(new_p0 != 0, d * mu0 + _div(k * m0, new_p0), mu0)
    new_mu1 = tl.where(new_p1 != 0, d * mu1 + _div(k * m1, new_p1), mu1)
    inf = float("inf")
    finite = (tl.abs(b1) < inf) & (tl.abs(m0) < inf) & (tl.abs(m1) < inf)  # False for NaN too
    p_ty = p_ptr.dtype.element_ty
    mu_ty = mu_ptr.dtype.element_ty
    tl.store(p0_ptr, _cast_to(tl.where(finite, new_p0, p0), p_ty), mask=mask)
    tl.store(p0_ptr + stride_p_z, _cast_to(tl.where(finite, new_p1, p1), p_ty), mask=mask)
    tl.store(mu0_ptr, _cast_to(tl.where(finite, new_mu0, mu0), mu_ty), mask=mask)
    tl.store(mu0_ptr + stride_mu_z, _cast_to(tl.where(finite, new_mu1, mu1), mu_ty), mask=mask)


# ---- launchers --------------------------------------------------------------------------
#
# What a call needs beyond its tensors (grid, block sizes, strides, flags) is a launch plan,
# computed once per (shape, strides, dtype, device, ...) and kept in _PLANS: the hot path is a
# dict lookup, the allocations and the launches.

_PLANS: dict = {}
_MAX_PLANS = 4096  # a model with dynamic shapes makes plans without end: start afresh past this
_NO_GUARD = contextlib.nullcontext()


def _launcher(fn):
    """Under the interpreter numpy runs the kernels: keep it quiet about the NaN and Inf that the
    SPEC lets through (a NaN in y, an empty batch's 0 / 0 in the update)."""
    if not INTERPRETED:
        return fn
    import numpy as np

    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return quiet


def _on_device(device: torch.device):
    """Triton launches on the current device and its current stream: make it the tensors' device
    for the launches (a no-op context when it already is, as in the usual one-GPU process)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


def _plan(key, make, *args):
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = make(*args)
    return plan


def _as_3d(y: torch.Tensor) -> torch.Tensor:
    """(A, C, ...) as (A, C, B): a view where the strides allow (always for a contiguous y)."""
    if y.dim() < 2:
        raise RuntimeError(f"shade_ops: y must be (A, C, B) or (A, C, ...), got {y.dim()} dims")
    return y if y.dim() == 3 else y.reshape(y.shape[0], y.shape[1], math.prod(y.shape[2:]))


def _view_3d(y: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int], bool]:
    """The (A, C, B) shape and strides of y, and whether they are those of a view of y (else y
    has to be reshaped, which copies, at every call)."""
    view = _as_3d(y)
    is_view = view.dim() == y.dim() or view.data_ptr() == y.data_ptr() and view._is_view()
    return tuple(view.shape), tuple(view.stride()), is_view


def _check(y: torch.Tensor, C: int, mu: torch.Tensor, reduction: str) -> bool:
    """Checks the op arguments (C: the units of y as (A, C, B)); returns whether the reduction is
    the mean."""
    if not y.is_floating_point():
        raise RuntimeError(f"shade_ops: y must be floating point, got {y.dtype}")
    if mu.dim() != 2 or mu.shape[0] != 2 or mu.shape[1] != C:
        raise RuntimeError(f"shade_ops: mu must have shape (2, C) with C = {C}, got "
                           f"{tuple(mu.shape)}")
    if y.device != mu.device:
        raise RuntimeError(f"shade_ops: y ({y.device}) and mu ({mu.device}) must be on one device")
    if reduction not in ("mean", "sum"):
        raise RuntimeError(f"shade_ops: reduction must be 'mean' or 'sum', got {reduction!r}")
    if y.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"shade_ops: the Triton kernels run on CPU tensors only under "
                           f"TRITON_INTERPRET=1, {INTERPRETER_UNAVAILABLE}")
    return reduction == "mean"


def _merged_stride(shape, strides) -> bool:
    """Whether dims 1 and 2 of an (A, C, B) walk as one: column j = c * B + b at j * stride(2)."""
    return shape[2] == 1 or shape[1] == 1 or strides[1] == shape[2] * strides[2]


def _flat_stride(shape, strides) -> int:
    return strides[2] if shape[2] > 1 or shape[1] == 1 else strides[1]


def _col_strides(shape, strides) -> tuple[int, int, int, bool]:
    """(stride_a, stride_c, stride_b, flat) as the column kernels take them."""
    flat = _merged_stride(shape, strides)
    return (strides[0], strides[1], _flat_stride(shape, strides) if flat else strides[2], flat)


class _ForwardPlan:
    __slots__ = ("reshape", "C", "count", "acc", "empty", "columns", "grid", "args", "meta",
                 "scratch", "groups")


# Per (device, stream): the forward's int32 completion counters, all 0 between launches, and its
# scratch (partial sums, group penalties). One launch at a time uses them, as launches on one
# stream run in order; the caching allocator reuses a replaced buffer only in stream order.
_COUNTERS: dict = {}
_SCRATCH: dict = {}


def _stream_buffer(buffers: dict, device: torch.device, stream: int, dtype: torch.dtype,
                   needed: int) -> torch.Tensor:
    key = (device, stream, dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < needed:
        size = max(needed, 2 * buffer.numel() if buffer is not None else 1024)
        # zeros: the counters' state between launches (the scratch is written before it is read)
        buffer = buffers[key] = torch.zeros(size, dtype=dtype, device=device)
    return buffer


def _forward_plan(y: torch.Tensor, mu: torch.Tensor, reduction: str,
                  with_relu: bool) -> _ForwardPlan:
    shape, strides, is_view = _view_3d(y)
    mean = _check(y, shape[1], mu, reduction)
    plan = _ForwardPlan()
    A, C, B = shape
    plan.reshape, plan.C, plan.count = not is_view, C, A * B
    plan.acc = accumulation_dtype(y.dtype)
    plan.empty = A * B == 0 or C == 0
    if plan.empty:
        return plan
    ACC = _acc_dtype(y.dtype)
    sms = _sm_count(y.device)
    plan.columns = _uses_columns(A, B)
    if plan.columns:
        ncol = C * B
        block_r, block_col, units_per_block = _unit_column_tile(A, C, B)
        cols_per_block = units_per_block * B
        col_blocks = _cdiv(C, units_per_block)
        rows_per_chunk, chunks = _row_chunks(A, block_r, col_blocks, A * ncol, sms * _FWD_PER_SM,
                                             _MIN_WORK, _PARTIAL_ROWS)
        plan.scratch = 4 * chunks * ncol  # partial[4, chunks, C, B], then the group penalties
        stride_a, stride_c, stride_b, flat = _col_strides(shape, strides)
        plan.grid, plan.groups = (chunks * col_blocks,), col_blocks
        plan.args = (A, ncol, C, B, A * B, stride_a, stride_c, stride_b, mu.stride(0),
                     mu.stride(1), rows_per_chunk, chunks, col_blocks, cols_per_block,
                     units_per_block, chunks * ncol)
        block_u = _pow2(units_per_block)
        plan.meta = dict(FLAT=flat, HAS_RELU=with_relu, MEAN=mean, ACC=ACC,
                         ALIGN=_alignment(stride_a, ncol, cols_per_block),
                         NUM_STAGES=_NUM_STAGES, BLOCK_R=block_r, BLOCK_COL=block_col,
                         BLOCK_U=block_u, BLOCK_P=max(1, min(_pow2(chunks * B), _TILE // block_u)),
                         BLOCK_G=min(_pow2(col_blocks), 1024), num_warps=_NUM_WARPS)
    else:
        block_r, block_col = _run_tile(A, B)
        rows_per_piece, cols_per_piece, row_pieces, col_pieces = _run_pieces(
            A, B, C, block_r, block_col, sms * _FWD_PER_SM)
        pieces = row_pieces * col_pieces
        plan.scratch = 4 * C * pieces  # partial[4, C, pieces], then the group penalties
        plan.grid, plan.groups = (C * pieces,), C
        plan.args = (A, C, B, A * B, *strides, mu.stride(0), mu.stride(1),
                     rows_per_piece, cols_per_piece, col_pieces, pieces)
        plan.meta = dict(HAS_RELU=with_relu, MEAN=mean, ACC=ACC,
                         ALIGN=_alignment(strides[0], strides[1], B, cols_per_piece),
                         NUM_STAGES=_NUM_STAGES, BLOCK_R=block_r, BLOCK_COL=block_col,
                         BLOCK_P=min(_pow2(pieces), _TILE), BLOCK_G=min(_pow2(C), 1024),
                         num_warps=_NUM_WARPS)
    return plan


def _forward(y: torch.Tensor, mu: torch.Tensor, reduction: str, with_relu: bool):
    """(penalty, sums, relu(y) of y's shape or None, copy of mu), in one launch."""
    plan = _plan((y.shape, y.stride(), y.dtype, y.device, mu.shape, mu.stride(), mu.dtype,
                  mu.device, reduction, with_relu), _forward_plan, y, mu, reduction, with_relu)
    device = y.device
    acc = plan.acc
    C = plan.C
    out = torch.empty(y.shape, dtype=y.dtype, device=device) if with_relu else None
    sums = torch.empty((4, C), dtype=acc, device=device)
    penalty = torch.empty((), dtype=acc, device=device)
    mu_copy = torch.empty((2, C), dtype=mu.dtype, device=device)
    if plan.empty:  # an empty batch costs nothing
        sums.zero_()
        sums[3].fill_(float(plan.count))
        penalty.zero_()
        return penalty, sums, out, mu_copy.copy_(mu)
    if plan.reshape:
        y = _as_3d(y)
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    scratch = _stream_buffer(_SCRATCH, device, stream, acc, plan.scratch + plan.groups)
    counters = _stream_buffer(_COUNTERS, device, stream, torch.int32, plan.groups + 1)
    with _on_device(device):
        # kernels looked up at each call, not kept in the plan: tests wrap them
        kernel = _penalty_fwd_columns_kernel if plan.columns else _penalty_fwd_runs_kernel
        kernel[plan.grid](y, mu, out if with_relu else scratch, scratch, sums, penalty, scratch,
                          mu_copy, counters, plan.scratch, *plan.args, **plan.meta)
    return penalty, sums, out, mu_copy


@_launcher
def penalty_forward(y: torch.Tensor, mu: torch.Tensor,
                    reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The penalty of SPEC section 2, the (4, C) batch sums (sum s, sum s*y, sum q*y, K) and a
    contiguous copy of mu (what autograd keeps for the backward). y: (A, C, B) or (A, C, ...)."""
    penalty, sums, _, mu_copy = _forward(y, mu, reduction, with_relu=False)
    return penalty, sums, mu_copy


@_launcher
def relu_penalty_forward(
        y: torch.Tensor, mu: torch.Tensor,
        reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(penalty, sums, relu(y), copy of mu): :func:`penalty_forward` plus relu(y), a contiguous
    tensor of y's shape written in the same pass."""
    return _forward(y, mu, reduction, with_relu=True)


class _BackwardPlan:
    __slots__ = ("reshape", "go_reshape", "grid", "args", "meta")


def _backward_plan(grad_penalty: torch.Tensor, y: torch.Tensor, mu: torch.Tensor,
                   reduction: str, grad_out: torch.Tensor | None) -> _BackwardPlan:
    if grad_out is not None and grad_out.shape != y.shape:
        raise RuntimeError(f"shade_ops: grad_out must have y's shape {tuple(y.shape)}, got "
                           f"{tuple(grad_out.shape)}")
    shape, strides, is_view = _view_3d(y)
    mean = _check(y, shape[1], mu, reduction)
    plan = _BackwardPlan()
    plan.reshape = not is_view
    if math.prod(shape) == 0:
        return plan
    go_shape, go_strides, go_is_view = _view_3d(grad_out) if grad_out is not None \
        else (shape, strides, True)
    plan.go_reshape = not go_is_view
    A, C, B = shape
    ncol = C * B
    block_r, block_col = _column_tile(A, ncol)
    col_blocks = _cdiv(ncol, block_col)
    rows_per_chunk, chunks = _row_chunks(A, block_r, col_blocks, A * ncol,
                                         _sm_count(y.device) * _BWD_PER_SM, _BWD_MIN_WORK)
    stride_a, stride_c, stride_b, flat = _col_strides(shape, strides)
    go_a, go_c, go_b, go_flat = _col_strides(go_shape, go_strides)
    plan.grid = (chunks * col_blocks,)
    plan.args = (A, ncol, B, A * B, stride_a, stride_c, stride_b, mu.stride(0), mu.stride(1),
                 go_a, go_c, go_b, rows_per_chunk, col_blocks)
    plan.meta = dict(FLAT=flat, GO_FLAT=go_flat, MEAN=mean, HAS_GRAD_OUT=grad_out is not None,
                     ACC=_acc_dtype(y.dtype), ALIGN=_alignment(stride_a, go_a, ncol),
                     BLOCK_R=block_r, BLOCK_COL=block_col, num_warps=_NUM_WARPS)
    return plan


@_launcher
def penalty_backward(grad_penalty: torch.Tensor, y: torch.Tensor, mu: torch.Tensor,
                     reduction: str, grad_out: torch.Tensor | None = None) -> torch.Tensor:
    """grad_penalty * d penalty / d y (SPEC section 3), plus grad_out * (y > 0) when grad_out is
    given (the fused ShadeReLU), as a contiguous tensor of y's shape and dtype."""
    has_go = grad_out is not None
    plan = _plan((y.shape, y.stride(), y.dtype, y.device, mu.shape, mu.stride(), mu.dtype,
                  mu.device, reduction, grad_out.shape if has_go else None,
                  grad_out.stride() if has_go else None), _backward_plan,
                 grad_penalty, y, mu, reduction, grad_out)
    device = y.device
    grad = torch.empty(y.shape, dtype=y.dtype, device=device)
    if grad.numel() == 0:
        return grad
    if grad_penalty.device != device:
        grad_penalty = grad_penalty.to(device)
    if plan.reshape:
        y = _as_3d(y)
    go = y
    if has_go:
        go = _as_3d(grad_out) if plan.go_reshape else grad_out
    with _on_device(device):
        _penalty_bwd_kernel[plan.grid](grad_penalty, y, mu, go, grad, *plan.args, **plan.meta)
    return grad


def _float32_pair(x: float) -> tuple[float, float]:
    """(hi, lo), both float32 values, hi = float32(x) and hi + lo = x to about 48 bits."""
    def float32(v: float) -> float:
        return struct.unpack("f", struct.pack("f", v))[0]

    hi = float32(float(x))
    return hi, float32(float(x) - hi)


@functools.lru_cache(maxsize=64)
def _decay_args(decay: float) -> tuple[float, float, float, float]:
    return (*_float32_pair(decay), *_float32_pair(1.0 - decay))


class _UpdatePlan:
    __slots__ = ("C", "grid", "args", "meta")


def _update_plan(p: torch.Tensor, mu: torch.Tensor, sums: torch.Tensor) -> _UpdatePlan:
    if p.dim() != 2 or p.shape[0] != 2:
        raise RuntimeError(f"update_state: p must have shape (2, C), got {tuple(p.shape)}")
    if mu.shape != p.shape:
        raise RuntimeError("update_state: mu must have the shape of p")
    if sums.dim() != 2 or sums.shape[0] != 4 or sums.shape[1] != p.shape[1]:
        raise RuntimeError("update_state: sums must have shape (4, C)")
    plan = _UpdatePlan()
    C = plan.C = p.shape[1]
    block = min(_pow2(C), 1024)
    plan.grid = (_cdiv(C, block),)
    plan.args = (C, p.stride(0), p.stride(1), mu.stride(0), mu.stride(1),
                 sums.stride(0), sums.stride(1))
    plan.meta = dict(COMPUTE=_acc_dtype(torch.promote_types(p.dtype, sums.dtype)), BLOCK=block,
                     num_warps=_NUM_WARPS)
    return plan


@_launcher
def update_state(p: torch.Tensor, mu: torch.Tensor, sums: torch.Tensor, decay: float) -> None:
    """Algorithm 1 of the paper with the guards of SPEC section 4, in place, in one launch."""
    plan = _plan((p.shape, p.stride(), p.dtype, mu.shape, mu.stride(), sums.shape,
                  sums.stride(), sums.dtype, p.device), _update_plan, p, mu, sums)
    if plan.C == 0:
        return
    with _on_device(p.device):
        _update_state_kernel[plan.grid](p, mu, sums, *plan.args, *_decay_args(decay),
                                        **plan.meta)


# ---- registration -----------------------------------------------------------------------

INTERPRETER_UNAVAILABLE = (
    "which must be set before Triton is first imported (Triton was imported without it, so its "
    "kernels are compiled for a GPU)")

if _registry.NATIVE_OPS is not None:
    # The CUDA kernels of the ops csrc/shade_ops.cpp declares: one op definition, whose fake and
    # autograd registrations _registry.py made once. Registering touches no CUDA device.
    for _name, _fn in (("penalty_forward", penalty_forward),
                       ("relu_penalty_forward", relu_penalty_forward),
                       ("penalty_backward", penalty_backward),
                       ("update_state", update_state)):
        torch.library.register_kernel(f"shade_ops::{_name}", "cuda", _fn)
    CUDA_OPS: _registry.PenaltyOps | None = _registry.NATIVE_OPS
    CUDA_UNAVAILABLE: str | None = None
else:
    CUDA_OPS = None
    CUDA_UNAVAILABLE = (f"shade_ops._C declares the ops the Triton kernels implement, and it "
                        f"cannot be used: {_registry.NATIVE_IMPORT_ERROR}")

# CPU tensors under the interpreter: opaque ops with the schemas of csrc/shade_ops.cpp.
_SCHEMAS = {
    "triton_penalty_forward": "(Tensor y, Tensor mu, str reduction) -> (Tensor, Tensor, Tensor)",
    "triton_relu_penalty_forward":
        "(Tensor y, Tensor mu, str reduction) -> (Tensor, Tensor, Tensor, Tensor)",
    "triton_penalty_backward": "(Tensor grad_penalty, Tensor y, Tensor mu, str reduction, "
                               "Tensor? grad_out=None) -> Tensor",
    "triton_update_state": "(Tensor(a!) p, Tensor(b!) mu, Tensor sums, float decay) -> ()",
}
_LAUNCHERS = {
    "triton_penalty_forward": penalty_forward,
    "triton_relu_penalty_forward": relu_penalty_forward,
    "triton_penalty_backward": penalty_backward,
    "triton_update_state": update_state,
}
for _name, _schema in _SCHEMAS.items():
    torch.library.define(f"shade_ops::{_name}", _schema)
    torch.library.impl(f"shade_ops::{_name}", "cpu", _LAUNCHERS[_name])

torch.library.register_fake("shade_ops::triton_update_state")(lambda p, mu, sums, decay: None)
_registry.register_penalty_ops(torch.ops.shade_ops.triton_penalty_forward.default,
                          torch.ops.shade_ops.triton_relu_penalty_forward.default,
                          torch.ops.shade_ops.triton_penalty_backward.default)

INTERPRETER_OPS: _registry.PenaltyOps | None = _registry.PenaltyOps(
    forward=torch.ops.shade_ops.triton_penalty_forward.default,
    relu_forward=torch.ops.shade_ops.triton_relu_penalty_forward.default,
    backward=torch.ops.shade_ops.triton_penalty_backward.default,
    update=torch.ops.shade_ops.triton_update_state.default,
) if INTERPRETED else None

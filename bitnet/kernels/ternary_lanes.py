"""The ternary matmul on AVX-512 VNNI with the weights' rows in the vector lanes (``i2x16`` layout).

The ``i2`` kernels take dot products along k: every accumulator holds 16 partial sums of one
row, summed across lanes at the end, and a batch of tokens needs the codes decoded again or
stored as bytes. Here the weights come 16 rows to a vector (``bitnet.formats.i2x16``): one
64-byte load holds 16 rows x 16 columns, and a shift and a mask give the codes of 4 columns
of each of the 16 rows, one row per int32 lane. The 4 activations of those columns, broadcast
to every lane (``vpdpbusd``'s ``{1to16}`` memory operand), multiply all 16 rows at once:

* each token has one accumulator, whose lanes are the 16 rows' sums: no lane sums, no
  transposes, and a token's 16 outputs leave in one vector (``_emit_group``);
* a tile decodes each weight vector once for 8 tokens (``_tile8``), 4 (``_tile4``) or 1
  (``_tile1``, which keeps 4 accumulators so that the multiply-adds do not wait on each other);
  the 16 rows' weights (4 ``kp`` bytes) stay in L1/L2 while the tiles pass over the tokens.

Exact in int32 whatever ``k``: ``vpdpbusd`` and the adds wrap modulo ``2**32``, and the
result, ``sum(c q) - sum(q)``, fits in int32 for the ``k`` that ``bitnet.ops`` accepts, so
the wrapped lanes give it exactly. Each group of 16 rows is computed by one ``prange``
iteration in a fixed order, so results are bit-identical for any thread count.
"""

from __future__ import annotations

from numba import njit, prange

from .simd import (
    add_acc,
    and_bytes,
    dequantize,
    dot_acc,
    lane,
    load_bytes,
    load_floats,
    prefetch,
    shift_right_bytes,
    splat_acc,
    splat_bytes,
    splat_floats,
    splat_four_bytes,
    store_vector,
    zero_acc,
)
from .ternary_blocks import KERNEL, emit, field_masks, unmask

GROUP_ROWS = 16  # rows of a weight vector: one per int32 lane
GROUP_COLUMNS = 16  # columns of a weight vector: 4 per 2-bit field of a byte
# How far ahead of the loads a tile prefetches its weights (one contiguous stream per group).
PREFETCH_BYTES = 4096
# Weight vectors ``_tile1`` sums before unmasking: a lane of its last field gains at most
# 4 x 128 x 128 = 2**16 a vector, so 2**14 vectors keep it within int32 (exact before the shift).
FOLD_VECTORS = 2**14


@njit(inline="always", **KERNEL)
def _codes(isa, x, field):
    """Codes of columns ``4 field .. 4 field + 3`` of a weight vector's 16 rows, one byte each."""
    return and_bytes(shift_right_bytes(x, 2 * field), splat_bytes(isa, 3))


@njit(inline="always", **KERNEL)
def _weights(isa, w, g, s):
    """Vector ``s`` of group ``g`` (16 rows x 16 columns), prefetching the group's stream ahead of it."""
    at = g * w.shape[1] + 64 * s
    prefetch(w, at + PREFETCH_BYTES)
    return load_bytes(isa, w, at)


@njit(inline="always", **KERNEL)
def _four_rows(q, t):
    """Where tokens ``t .. t + 3`` start in flat ``q``; past its last row, the last row again (a padding
    token of a tile, whose outputs ``_emit_group`` does not write)."""
    kp, last = q.shape[1], q.shape[0] - 1
    return min(t, last) * kp, min(t + 1, last) * kp, min(t + 2, last) * kp, min(t + 3, last) * kp


@njit(inline="always", **KERNEL)
def _four_tokens(isa, c, q, at, rows, a0, a1, a2, a3):
    """The accumulators of 4 tokens (starting at ``rows`` in flat ``q``) plus the codes ``c`` times each
    token's 4 activations ``at`` columns into its row."""
    return (dot_acc(isa, a0, c, splat_four_bytes(isa, q, rows[0] + at)),
            dot_acc(isa, a1, c, splat_four_bytes(isa, q, rows[1] + at)),
            dot_acc(isa, a2, c, splat_four_bytes(isa, q, rows[2] + at)),
            dot_acc(isa, a3, c, splat_four_bytes(isa, q, rows[3] + at)))


@njit(**KERNEL)
def _tile8(isa, w, g, q, t):
    """The int32 sums ``sum(c q[t + j])`` of group ``g``'s 16 rows for the 8 tokens ``j``."""
    first, second = _four_rows(q, t), _four_rows(q, t + 4)
    a0, a1, a2, a3 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
    a4, a5, a6, a7 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
    for s in range(q.shape[1] // GROUP_COLUMNS):
        x = _weights(isa, w, g, s)
        for field in range(4):
            c = _codes(isa, x, field)
            at = GROUP_COLUMNS * s + 4 * field
            a0, a1, a2, a3 = _four_tokens(isa, c, q, at, first, a0, a1, a2, a3)
            a4, a5, a6, a7 = _four_tokens(isa, c, q, at, second, a4, a5, a6, a7)
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(**KERNEL)
def _tile4(isa, w, g, q, t):
    """``_tile8`` for the 4 tokens from ``t``."""
    rows = _four_rows(q, t)
    a0, a1, a2, a3 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
    for s in range(q.shape[1] // GROUP_COLUMNS):
        x = _weights(isa, w, g, s)
        for field in range(4):
            a0, a1, a2, a3 = _four_tokens(isa, _codes(isa, x, field), q, GROUP_COLUMNS * s + 4 * field, rows,
                                          a0, a1, a2, a3)
    return a0, a1, a2, a3


@njit(**KERNEL)
def _tile1(isa, w, g, q, t):
    """``_tile8`` for token ``t`` alone, one accumulator per 2-bit field (4 independent chains).

    Each field is masked in place (``field_masks``) rather than shifted down: one operation per
    field instead of two, which lets the loop keep up with DRAM (the GEMV is this loop).
    """
    kp = q.shape[1]
    mask0, mask1, mask2, mask3 = field_masks(isa)
    vectors = kp // GROUP_COLUMNS
    total = zero_acc(isa)
    for start in range(0, vectors, FOLD_VECTORS):
        a0, a1, a2, a3 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        for s in range(start, min(vectors, start + FOLD_VECTORS)):
            x = _weights(isa, w, g, s)
            at = t * kp + GROUP_COLUMNS * s
            a0 = dot_acc(isa, a0, and_bytes(x, mask0), splat_four_bytes(isa, q, at))
            a1 = dot_acc(isa, a1, and_bytes(x, mask1), splat_four_bytes(isa, q, at + 4))
            a2 = dot_acc(isa, a2, and_bytes(x, mask2), splat_four_bytes(isa, q, at + 8))
            a3 = dot_acc(isa, a3, and_bytes(x, mask3), splat_four_bytes(isa, q, at + 12))
        total = add_acc(total, unmask(a0, a1, a2, a3))
    return total


@njit(inline="always", **KERNEL)
def _emit_group(isa, sums, t, g, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """``emit`` for token ``t`` and the rows of group ``g`` (lane ``i``: row ``16 g + i``).

    A whole group leaves in one vector (the same float32 operations as ``emit``, so the same
    bits); the last group of a matrix whose rows are not a multiple of 16, lane by lane.
    Inlined: as a call its six array arguments (~45 scalars) cost more than its work, and with
    the 10 calls per group of 8 tokens a 2560 x 2560 matmul ran 1.18x slower (NOTES.md).
    """
    if t >= q_sum.shape[0]:
        return  # a padding token
    m = out.shape[1] if as_float else acc.shape[1]
    first = GROUP_ROWS * g
    if first + GROUP_ROWS > m:
        _emit_lanes(sums, t, first, m - first, q_sum, act_scale, scale, scale_step, acc, out, as_float)
        return
    value = add_acc(sums, splat_acc(isa, -q_sum[t]))
    if not as_float:
        store_vector(acc, t * m + first, value)
        return
    factors = load_floats(isa, scale, first) if scale_step else splat_floats(isa, scale[0])
    store_vector(out, t * m + first, dequantize(value, splat_floats(isa, act_scale[t]), factors))


@njit(**KERNEL)
def _emit_lanes(sums, t, first, rows, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """``emit`` for token ``t`` and rows ``first .. first + rows - 1`` from the first lanes of ``sums``."""
    for i in range(rows):
        emit(t, first + i, lane(sums, i), q_sum, act_scale, scale, scale_step, acc, out, as_float)


@njit(inline="always", **KERNEL)
def _emit_four(isa, s0, s1, s2, s3, t, g, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """``_emit_group`` for tokens ``t .. t + 3``."""
    _emit_group(isa, s0, t, g, q_sum, act_scale, scale, scale_step, acc, out, as_float)
    _emit_group(isa, s1, t + 1, g, q_sum, act_scale, scale, scale_step, acc, out, as_float)
    _emit_group(isa, s2, t + 2, g, q_sum, act_scale, scale, scale_step, acc, out, as_float)
    _emit_group(isa, s3, t + 3, g, q_sum, act_scale, scale, scale_step, acc, out, as_float)


@njit(inline="always", **KERNEL)
def padded_tokens(n):
    """Tokens ``lanes_matmul`` computes for ``n``: three left over after the tiles of 8 go as a tile of 4, and
    so 7 as a tile of 8; the padding repeats the last token and its outputs are not written.

    A group's later tiles read its rows from L2 while DRAM waits, so a token left over costs a
    whole pass: 3 tokens took 28.4 ms a decode step against 23.1 for 4 (NOTES.md). One or two
    left over stay passes of one token: a tile of 4 costs more arithmetic than they do.
    """
    return n + 1 if n % 4 == 3 else n


@njit(parallel=True, **KERNEL)
def lanes_matmul(isa, w, q, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """``q @ (c - 1).T`` for ``i2x16`` data ``w`` (``ceil(m / 16)``, ``4 kp``) and padded int8 ``q`` (n, kp).

    Writes ``acc`` (int32, (n, m)) or, with ``as_float``, ``out`` (float32, (n, m)) =
    ``acc / act_scale[t] * scale[r * scale_step]``, as ``ternary_matmul`` does for ``i2``.
    Tokens go in tiles of 8, then one of 4, then one at a time (``padded_tokens``). The outputs
    of 4 tokens leave through one call site of the inlined ``_emit_four`` (each inlined copy
    costs compile time). A token's outputs are the same bits in any tile.
    """
    tokens = padded_tokens(q.shape[0])
    for g in prange(w.shape[0]):
        t = 0
        while t + 4 <= tokens:
            if t + 8 <= tokens:
                s0, s1, s2, s3, s4, s5, s6, s7 = _tile8(isa, w, g, q, t)
                fours = 2
            else:
                s0, s1, s2, s3 = _tile4(isa, w, g, q, t)
                s4, s5, s6, s7 = s0, s1, s2, s3
                fours = 1
            for _ in range(fours):
                _emit_four(isa, s0, s1, s2, s3, t, g, q_sum, act_scale, scale, scale_step, acc, out, as_float)
                s0, s1, s2, s3 = s4, s5, s6, s7
                t += 4
        while t < tokens:
            _emit_group(isa, _tile1(isa, w, g, q, t), t, g, q_sum, act_scale, scale, scale_step, acc, out, as_float)
            t += 1

"""The ternary matmul as outer products on AVX-512 VNNI (batches of ``OUTER_MIN_TOKENS`` tokens or more).

The GEMM tiles of ``ternary_simd`` take dot products along k: each accumulator holds 16
partial sums of one row and token, summed across lanes at the end, and each code vector is
decoded in the loop. Here each accumulator lane is a different token instead:

* the rows' codes are decoded to bytes once per ``OUTER_ROWS`` rows (``ternary_blocks.decode_rows``,
  row by row, as the ``amx`` path decodes them);
* the activations are laid out once per call in VNNI layout, 16 tokens x 4 k per 64 bytes
  (``ternary_blocks.vnni_activations``, as for AMX tiles), offset by 128 (``OFFSET_WORD``) to
  be the unsigned operand of ``vpdpbusd``;
* a tile (``tile_outer``) is 16 rows x 16 tokens: for every 4 k, one 64-byte load of the
  tokens' activations and one ``vpdpbusd`` per row with that row's 4 codes broadcast from
  memory. No decode and no lane sums in the loop: ~100% of the ``vpdpbusd`` peak from L2
  (NOTES.md), against ~83% for the dot-product tile;
* the 16 accumulators are transposed into ``sums`` (token by token) and each token's 16
  outputs leave in one vector (``emit_tile``).

The offset is undone exactly: each accumulator starts from ``-128 sum(codes of its row)``, so
it ends at ``sum(c q)``, and ``emit`` subtracts ``sum(q)`` as on every path. A lane adds at
most ``255 * 2`` per k, so int32 holds it for ``k <= AMX_MAX_K`` (the ``amx`` path's bound).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .simd import (
    add_acc,
    dequantize,
    dot_acc,
    load_bytes,
    load_floats,
    load_ints,
    splat_acc,
    splat_floats,
    splat_four_bytes,
    store_transposed,
    store_vector,
)
from .ternary_blocks import KERNEL, decode_rows, emit

OUTER_ROWS = 16  # rows of a tile: one accumulator each
OUTER_TOKENS = 16  # tokens of a tile: the 16 int32 lanes of an accumulator
OUTER_MIN_TOKENS = 16  # from this many tokens the avx512vnni path multiplies in outer products


@njit(**KERNEL)
def tile_outer(isa, codes, code_sums, tiles, stride, t0, sums):
    """``sums[j, i] = sum(c[i] q[t0 + j])`` for the 16 decoded rows ``i`` of ``codes`` and the 16
    tokens ``j`` from ``t0`` of ``tiles`` (the bytes of ``vnni_activations`` with the offset,
    ``stride`` bytes per 4 k), transposed from the accumulators (lane = token)."""
    kp = codes.shape[1]
    a0, a1, a2, a3 = (splat_acc(isa, code_sums[0]), splat_acc(isa, code_sums[1]), splat_acc(isa, code_sums[2]),
                      splat_acc(isa, code_sums[3]))
    a4, a5, a6, a7 = (splat_acc(isa, code_sums[4]), splat_acc(isa, code_sums[5]), splat_acc(isa, code_sums[6]),
                      splat_acc(isa, code_sums[7]))
    a8, a9, a10, a11 = (splat_acc(isa, code_sums[8]), splat_acc(isa, code_sums[9]), splat_acc(isa, code_sums[10]),
                        splat_acc(isa, code_sums[11]))
    a12, a13, a14, a15 = (splat_acc(isa, code_sums[12]), splat_acc(isa, code_sums[13]),
                          splat_acc(isa, code_sums[14]), splat_acc(isa, code_sums[15]))
    for g in range(kp // 4):
        x = load_bytes(isa, tiles, g * stride + 4 * t0)
        at = 4 * g
        a0 = dot_acc(isa, a0, x, splat_four_bytes(isa, codes, at))
        a1 = dot_acc(isa, a1, x, splat_four_bytes(isa, codes, at + kp))
        a2 = dot_acc(isa, a2, x, splat_four_bytes(isa, codes, at + 2 * kp))
        a3 = dot_acc(isa, a3, x, splat_four_bytes(isa, codes, at + 3 * kp))
        a4 = dot_acc(isa, a4, x, splat_four_bytes(isa, codes, at + 4 * kp))
        a5 = dot_acc(isa, a5, x, splat_four_bytes(isa, codes, at + 5 * kp))
        a6 = dot_acc(isa, a6, x, splat_four_bytes(isa, codes, at + 6 * kp))
        a7 = dot_acc(isa, a7, x, splat_four_bytes(isa, codes, at + 7 * kp))
        a8 = dot_acc(isa, a8, x, splat_four_bytes(isa, codes, at + 8 * kp))
        a9 = dot_acc(isa, a9, x, splat_four_bytes(isa, codes, at + 9 * kp))
        a10 = dot_acc(isa, a10, x, splat_four_bytes(isa, codes, at + 10 * kp))
        a11 = dot_acc(isa, a11, x, splat_four_bytes(isa, codes, at + 11 * kp))
        a12 = dot_acc(isa, a12, x, splat_four_bytes(isa, codes, at + 12 * kp))
        a13 = dot_acc(isa, a13, x, splat_four_bytes(isa, codes, at + 13 * kp))
        a14 = dot_acc(isa, a14, x, splat_four_bytes(isa, codes, at + 14 * kp))
        a15 = dot_acc(isa, a15, x, splat_four_bytes(isa, codes, at + 15 * kp))
    store_transposed(sums, 0, (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15))


@njit(**KERNEL)
def emit_tile(isa, t0, start, rows, n, sums, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """``emit`` for a tile's sums (``sums[j, i]``: token ``t0 + j``, row ``start + i``).

    A whole tile goes out in vectors, one store per token (the same float32 operations as
    ``emit``, so the same bits); a tile with fewer rows value by value.
    """
    m = out.shape[1] if as_float else acc.shape[1]
    for j in range(min(OUTER_TOKENS, n - t0)):
        t = t0 + j
        if rows < OUTER_ROWS:  # only the last tile of a task
            for i in range(rows):
                emit(t, start + i, sums[j, i], q_sum, act_scale, scale, scale_step, acc, out, as_float)
            continue
        value = add_acc(load_ints(isa, sums, j * OUTER_ROWS), splat_acc(isa, -q_sum[t]))
        if not as_float:
            store_vector(acc, t * m + start, value)
            continue
        factors = load_floats(isa, scale, start) if scale_step else splat_floats(isa, scale[0])
        store_vector(out, t * m + start, dequantize(value, splat_floats(isa, act_scale[t]), factors))


@njit(**KERNEL)
def gemm_outer(isa, w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """Rows ``first .. last - 1`` x all ``n`` tokens in outer-product tiles, 16 rows x 16 tokens.

    ``codes``: uint8 ``(OUTER_ROWS, kp)``, the decoded rows; ``sums``: int32
    ``(OUTER_TOKENS + 1, OUTER_ROWS)``, a tile's sums token by token, and in its last row the
    code sums the accumulators start from; ``tiles``: ``vnni_activations`` with the offset.
    Rows past ``last`` and tokens past ``n`` are computed on whatever the buffers hold and
    never stored.
    """
    flat_tiles = tiles.reshape(tiles.size).view(np.uint8)
    stride = 4 * tiles.shape[2]
    code_sums = sums[OUTER_TOKENS]
    for start in range(first, last, OUTER_ROWS):
        rows = min(last - start, OUTER_ROWS)
        decode_rows(isa, w, start, rows, codes, code_sums)
        for t0 in range(0, n, OUTER_TOKENS):
            tile_outer(isa, codes, code_sums, flat_tiles, stride, t0, sums)
            emit_tile(isa, t0, start, rows, n, sums, q_sum, act_scale, scale, scale_step, acc, out, as_float)

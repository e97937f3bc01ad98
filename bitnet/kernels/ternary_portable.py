"""The ternary matmul inner loops in plain Numba, for any CPU (the ``portable`` path).

LLVM vectorizes them for whatever the target CPU has; they give the same integers as the
SIMD loops, only slower.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .ternary_blocks import BLOCK, BLOCK_BYTES, KERNEL, TILE_TOKENS

PORTABLE_FLUSH_BLOCKS = 31  # 31 blocks x 1024 < 32767: int16 lanes of the portable path cannot overflow


@njit(**KERNEL)
def _row_portable(w, r, q, t, b0, b1, lanes):
    """``sum(c q[t])`` for row ``r`` over blocks ``b0 .. b1 - 1``, with int16 scratch ``lanes`` (64,).

    ``q`` may be int8 or int16 (the portable path passes int16, see ``_activations_for``).

    Lane ``j`` collects ``sum_i c(j + 64 i) q(j + 64 i)`` (at most 4 * 2 * 128 = 1024 a block)
    and is flushed every ``PORTABLE_FLUSH_BLOCKS`` blocks, before it could pass 32767.
    Written so LLVM vectorizes it well: 1-D slices indexed by ``range`` (2-D indexing with
    computed offsets keeps Numba's negative-index fix-up and becomes gathers, 14x slower),
    and int16 lanes (the widest type sets the vector length: 16 lanes per AVX2 register
    instead of 8 with int32; 3.2x faster than int32 sums in all).
    """
    total = 0
    for start in range(b0, b1, PORTABLE_FLUSH_BLOCKS):
        lanes[:] = 0
        for b in range(start, min(b1, start + PORTABLE_FLUSH_BLOCKS)):
            codes = w[r, b * BLOCK_BYTES : (b + 1) * BLOCK_BYTES]
            acts = q[t, b * BLOCK : (b + 1) * BLOCK]
            for j in range(BLOCK_BYTES):
                x = np.int16(codes[j])
                lanes[j] = np.int16(
                    lanes[j]
                    + (x & 3) * np.int16(acts[j])
                    + ((x >> 2) & 3) * np.int16(acts[64 + j])
                    + ((x >> 4) & 3) * np.int16(acts[128 + j])
                    + ((x >> 6) & 3) * np.int16(acts[192 + j])
                )
        for j in range(BLOCK_BYTES):
            total += lanes[j]
    return total


@njit(**KERNEL)
def row_pair_portable(w, r0, r1, q, t, b0, b1, lanes):
    """The portable GEMV step: rows ``r0`` and ``r1`` (one after the other) with token ``t``."""
    return _row_portable(w, r0, q, t, b0, b1, lanes), _row_portable(w, r1, q, t, b0, b1, lanes)


@njit(**KERNEL)
def tile_portable(w, r0, r1, q, t, b0, b1, lanes, sums, i):
    """The portable GEMM tile, adding into ``sums`` as ``tile_simd`` does: 8 GEMV steps, no decode reuse."""
    for j in range(TILE_TOKENS):
        s0, s1 = row_pair_portable(w, r0, r1, q, t + j, b0, b1, lanes)
        sums[t + j, i] += s0
        sums[t + j, i + 1] += s1

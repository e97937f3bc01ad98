"""The ternary matmul inner loops on x86 SIMD (AVX-512 VNNI, AVX-VNNI, AVX2), one source for all three.

* GEMV (``n == 1``, and the ``n % 8`` tokens left after the GEMM tiles): two rows at a time.
  Instead of shifting each byte to get code ``i``, it masks it in place
  (``byte & (3 << 2i)`` = ``c_i * 4**i``) into a separate accumulator per ``i``, and divides
  by ``4**i`` once at the end (exact: every lane is a multiple of ``4**i``). One load, four
  ``and`` and four multiply-adds per 256 weights; weights are prefetched 4 KB ahead.
* GEMM (``n >= 8``): a tile of 2 rows x 8 tokens (16 accumulators). Each 64-byte weight block
  is decoded (shift + mask) once into registers and reused for the 8 tokens, so the decode
  cost does not grow with ``n``. It prefetches the weights of the tile ``GEMM_PREFETCH_ROWS``
  rows on, which the hardware prefetcher alone does not bring from DRAM in time.

Accumulator lanes are flushed into int64 totals every ``FOLD_BLOCKS`` blocks, so no int32
lane can overflow whatever ``k``. The vector operations come from ``simd.py``; the ISA
marker passed first fixes the instruction set at compile time.
"""

from __future__ import annotations

from numba import njit

from .simd import (
    and_bytes,
    byte_vector_size,
    dot_acc,
    lane,
    lane_totals,
    load_bytes,
    prefetch,
    shift_right_bytes,
    splat_bytes,
    sum_acc,
    zero_acc,
)
from .ternary_blocks import BLOCK, BLOCK_BYTES, KERNEL, TILE_TOKENS, field_masks, unmask

FOLD_BLOCKS = 8192  # blocks summed in int32 lanes before flushing to int64 (lanes stay < 2**31)
# How far ahead of the loads the GEMV loop prefetches each of its two rows: DRAM latency needs
# several KB in flight per thread (4-16 KB stream the model's GEMVs ~25% faster than 1 KB; NOTES.md).
PREFETCH_BYTES = 4096
# The GEMM tile prefetches the same blocks of the rows this far below its own (the tile two pairs
# on): from DRAM, 2560x2560 n = 8 tiles ran at ~130 GMAC/s a core without, ~170-198 with (NOTES.md).
GEMM_PREFETCH_ROWS = 4


@njit(**KERNEL)
def row_pair_simd(isa, w, r0, r1, q, t):
    """``sum(c q[t])`` for stored codes ``c`` of rows ``r0`` and ``r1`` (GEMV inner loop)."""
    nb = w.shape[1] // BLOCK_BYTES
    wb, kp = w.shape[1], q.shape[1]
    step = byte_vector_size(isa)
    mask0, mask1, mask2, mask3 = field_masks(isa)
    total0 = 0
    total1 = 0
    for start in range(0, nb, FOLD_BLOCKS):
        a00, a01, a02, a03 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        a10, a11, a12, a13 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        for b in range(start, min(nb, start + FOLD_BLOCKS)):
            prefetch(w, r0 * wb + b * BLOCK_BYTES + PREFETCH_BYTES)
            prefetch(w, r1 * wb + b * BLOCK_BYTES + PREFETCH_BYTES)
            for h in range(0, BLOCK_BYTES, step):
                x0 = load_bytes(isa, w, r0 * wb + b * BLOCK_BYTES + h)
                x1 = load_bytes(isa, w, r1 * wb + b * BLOCK_BYTES + h)
                at = t * kp + b * BLOCK + h
                v = load_bytes(isa, q, at)
                a00 = dot_acc(isa, a00, and_bytes(x0, mask0), v)
                a10 = dot_acc(isa, a10, and_bytes(x1, mask0), v)
                v = load_bytes(isa, q, at + 64)
                a01 = dot_acc(isa, a01, and_bytes(x0, mask1), v)
                a11 = dot_acc(isa, a11, and_bytes(x1, mask1), v)
                v = load_bytes(isa, q, at + 128)
                a02 = dot_acc(isa, a02, and_bytes(x0, mask2), v)
                a12 = dot_acc(isa, a12, and_bytes(x1, mask2), v)
                v = load_bytes(isa, q, at + 192)
                a03 = dot_acc(isa, a03, and_bytes(x0, mask3), v)
                a13 = dot_acc(isa, a13, and_bytes(x1, mask3), v)
        total0 += sum_acc(unmask(a00, a01, a02, a03))
        total1 += sum_acc(unmask(a10, a11, a12, a13))
    return total0, total1


@njit(**KERNEL)
def tile_simd(isa, w, r0, r1, q, t, b0, b1, sums, i):
    """Adds ``sum(c q[t + j])`` over blocks ``b0 .. b1 - 1`` to ``sums[t + j, i]`` (row ``r0``) and
    ``sums[t + j, i + 1]`` (row ``r1``) for the 8 tokens ``j``.

    16 accumulators and the 2 decoded code vectors fit the 32 AVX-512 registers; activations
    are memory operands. The accumulators' lanes are summed by one shuffle tree (``lane_totals``).
    """
    wb, kp = w.shape[1], q.shape[1]
    step = byte_vector_size(isa)
    three = splat_bytes(isa, 3)
    for start in range(b0, b1, FOLD_BLOCKS):
        a00, a01, a02, a03 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        a04, a05, a06, a07 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        a10, a11, a12, a13 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        a14, a15, a16, a17 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        for b in range(start, min(b1, start + FOLD_BLOCKS)):
            prefetch(w, (r0 + GEMM_PREFETCH_ROWS) * wb + b * BLOCK_BYTES)
            prefetch(w, (r1 + GEMM_PREFETCH_ROWS) * wb + b * BLOCK_BYTES)
            for h in range(0, BLOCK_BYTES, step):
                x0 = load_bytes(isa, w, r0 * wb + b * BLOCK_BYTES + h)
                x1 = load_bytes(isa, w, r1 * wb + b * BLOCK_BYTES + h)
                for c in range(4):
                    c0 = and_bytes(shift_right_bytes(x0, 2 * c), three)
                    c1 = and_bytes(shift_right_bytes(x1, 2 * c), three)
                    at = t * kp + b * BLOCK + 64 * c + h
                    v = load_bytes(isa, q, at)
                    a00, a10 = dot_acc(isa, a00, c0, v), dot_acc(isa, a10, c1, v)
                    v = load_bytes(isa, q, at + kp)
                    a01, a11 = dot_acc(isa, a01, c0, v), dot_acc(isa, a11, c1, v)
                    v = load_bytes(isa, q, at + 2 * kp)
                    a02, a12 = dot_acc(isa, a02, c0, v), dot_acc(isa, a12, c1, v)
                    v = load_bytes(isa, q, at + 3 * kp)
                    a03, a13 = dot_acc(isa, a03, c0, v), dot_acc(isa, a13, c1, v)
                    v = load_bytes(isa, q, at + 4 * kp)
                    a04, a14 = dot_acc(isa, a04, c0, v), dot_acc(isa, a14, c1, v)
                    v = load_bytes(isa, q, at + 5 * kp)
                    a05, a15 = dot_acc(isa, a05, c0, v), dot_acc(isa, a15, c1, v)
                    v = load_bytes(isa, q, at + 6 * kp)
                    a06, a16 = dot_acc(isa, a06, c0, v), dot_acc(isa, a16, c1, v)
                    v = load_bytes(isa, q, at + 7 * kp)
                    a07, a17 = dot_acc(isa, a07, c0, v), dot_acc(isa, a17, c1, v)
        totals = lane_totals((a00, a01, a02, a03, a04, a05, a06, a07, a10, a11, a12, a13, a14, a15, a16, a17))
        for j in range(TILE_TOKENS):
            sums[t + j, i] += lane(totals, j)
            sums[t + j, i + 1] += lane(totals, TILE_TOKENS + j)

"""Numba kernels for the embedding table used as the output head: ``logits = h @ table.T``.

The table is the biggest tensor of a BitNet model (128256 x 2560 for 2B4T) and is read
once per generated token, so these loops stream it once. bf16 and f16 rows arrive as raw
uint16 words and are widened to float32 in registers (a shift for bf16, ``vcvtph2ps`` for
f16) by one kernel compiled per ``WordFormat``.

The int8 table is multiplied like llama.cpp's ``Q8_0 x Q8_0`` dot product: the hidden state
is quantized to int8 in blocks of ``INT8_BLOCK`` values, each with its own scale, so the
bytes meet in the CPU's byte multiply-adds (``vpdpbusd``) instead of being widened to float
one by one, which made the head compute bound at half the DRAM bandwidth (NOTES.md).
Those take one unsigned operand; with VNNI the table's bytes are offset by 128 and each
lane starts from ``-128 * sum(q)`` of its 4 activations: ``sum((t + 128) q) - 128 sum(q) =
sum(t q)``, exactly, in one ``xor`` and one ``vpdpbusd`` per 64 bytes (``simd.signed_dot``).
A thread takes 4 rows at a time and every token over them, so each 64 bytes of a token's
activations (and its offset and scales) are loaded once for 4 rows; a token's activations
and block scales (2.9 KB for 2B4T) and the 4 rows stay in L1.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from .quantize import quantize_blocks
from .simd import (
    block_scales,
    byte_vector_size,
    load_bytes,
    offset_sums,
    prefetch,
    scaled_add_floats,
    signed_dot,
    sum_floats,
    widen_word,
    zero_floats,
)

INT8_BLOCK = 32  # hidden-state values per activation scale of the int8 head (ggml's Q8_0 block)
HEAD_PREFETCH_ROWS = 2  # the head kernels prefetch the rows this far ahead of their own (NOTES.md)
# As in rows.py: vectorizable reductions, IEEE NaN/Inf kept, numpy's division semantics.
_KERNEL = dict(parallel=True, fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy", cache=True,
               nogil=True, boundscheck=False)
_ROW_KERNEL = {**_KERNEL, "parallel": False, "inline": "always"}  # the body of one prange iteration


@njit(**_ROW_KERNEL)
def _row_pair(i, vocab):
    """Rows ``(i, i + half)`` of a table of ``vocab`` rows (the odd middle row alone: ``(i, i)``).

    The head kernels take rows in these pairs, so that each thread streams two regions of
    the table at once, which DRAM serves 15% faster than one (NOTES.md).
    """
    half = (vocab + 1) // 2
    first = np.int64(i)
    return first, first + half if first + half < vocab else first


@njit(**_KERNEL)
def logits_words(word_format, table, h, out):
    """``out[t, r] = sum_j float32(table[r, j]) * h[t, j]``; ``table`` is ``(V, K)`` uint16 words.

    ``word_format`` (``BF16_WORDS`` or ``F16_WORDS`` of ``bitnet.kernels.simd``) says what
    the words hold. A plain loop that LLVM vectorizes (widen, FMA) for any CPU. Each row is
    computed by one thread in a fixed order, so the result does not depend on the number of
    threads.
    """
    vocab, width = table.shape
    for i in prange((vocab + 1) // 2):
        r0, r1 = _row_pair(i, vocab)
        for j in range(0, width, 32):  # one prefetch per 64-byte line
            prefetch(table, (r0 + HEAD_PREFETCH_ROWS) * width + j)
            prefetch(table, (r1 + HEAD_PREFETCH_ROWS) * width + j)
        for t in range(h.shape[0]):
            acc0 = np.float32(0.0)
            acc1 = np.float32(0.0)
            for j in range(width):
                x = h[t, j]
                acc0 += widen_word(word_format, table[r0, j]) * x
                acc1 += widen_word(word_format, table[r1, j]) * x
            out[t, r0] = acc0
            out[t, r1] = acc1


def _int8_rows(isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3):
    """``out[t, r] = row_scale[r] * sum_j table[r, j] q[t, j] block_scale[t, j // 32]`` for 4 rows."""


@overload(_int8_rows, jit_options=_ROW_KERNEL)
def _int8_rows_for(isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3):
    if isa.isa == "portable":
        def portable(isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3):
            for r in (r0, r1, r2, r3):
                _int8_row_portable(table, row_scale, q, block_scale, out, r)

        return portable
    return lambda isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3: _int8_rows_simd(
        isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3)


@njit(**_ROW_KERNEL)
def _int8_rows_simd(isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3):
    """Each run of 4 values meets in one int32 lane of a byte dot product, then gets its block's scale.

    The rows ``HEAD_PREFETCH_ROWS`` ahead of each (the next group) are prefetched a line per
    row per step of the first token's pass: the hardware prefetcher alone keeps too few lines
    in flight to stream the table at DRAM speed, and all 160 lines at once before the pass
    stalled on the CPU's miss buffers instead of overlapping the work (2 threads, n = 1:
    20.5-23.9 -> 13.8-14.3 ms for the 2B4T table; NOTES.md). The SIMD loads take flat indexes
    into the C-contiguous arrays: a ``reshape`` here would update the arrays' reference counts
    once per row from every thread, which cost a third of the time.
    """
    width = table.shape[1]
    blocks = block_scale.shape[1]
    step = byte_vector_size(isa)
    whole = width - width % step
    ahead = HEAD_PREFETCH_ROWS * width
    for t in range(q.shape[0]):
        total0, total1, total2, total3 = zero_floats(isa), zero_floats(isa), zero_floats(isa), zero_floats(isa)
        for j in range(0, whole, step):
            if t == 0:
                prefetch(table, r0 * width + ahead + j)
                prefetch(table, r1 * width + ahead + j)
                prefetch(table, r2 * width + ahead + j)
                prefetch(table, r3 * width + ahead + j)
            x = load_bytes(isa, q, t * width + j)
            offset = offset_sums(isa, x)
            scales = block_scales(isa, block_scale, t * blocks + j // INT8_BLOCK)
            total0 = scaled_add_floats(total0, signed_dot(isa, load_bytes(isa, table, r0 * width + j), x, offset),
                                       scales)
            total1 = scaled_add_floats(total1, signed_dot(isa, load_bytes(isa, table, r1 * width + j), x, offset),
                                       scales)
            total2 = scaled_add_floats(total2, signed_dot(isa, load_bytes(isa, table, r2 * width + j), x, offset),
                                       scales)
            total3 = scaled_add_floats(total3, signed_dot(isa, load_bytes(isa, table, r3 * width + j), x, offset),
                                       scales)
        out[t, r0] = _row_total(table, row_scale, q, block_scale, sum_floats(total0), t, r0, whole)
        out[t, r1] = _row_total(table, row_scale, q, block_scale, sum_floats(total1), t, r1, whole)
        out[t, r2] = _row_total(table, row_scale, q, block_scale, sum_floats(total2), t, r2, whole)
        out[t, r3] = _row_total(table, row_scale, q, block_scale, sum_floats(total3), t, r3, whole)


@njit(**_ROW_KERNEL)
def _row_total(table, row_scale, q, block_scale, acc, t, r, start):
    """``acc`` plus the scaled products of row ``r`` and token ``t`` from value ``start`` on, times the row's scale."""
    for j in range(start, table.shape[1]):
        acc += np.float32(np.int32(table[r, j]) * np.int32(q[t, j])) * block_scale[t, j // INT8_BLOCK]
    return acc * row_scale[r]


@njit(**_ROW_KERNEL)
def _int8_row_portable(table, row_scale, q, block_scale, out, r):
    """Plain loops for any CPU: an int32 dot product per block, then its scale."""
    width = table.shape[1]
    for t in range(q.shape[0]):
        acc = np.float32(0.0)
        for start in range(0, width, INT8_BLOCK):
            dot = np.int32(0)
            for j in range(start, min(width, start + INT8_BLOCK)):
                dot += np.int32(table[r, j]) * np.int32(q[t, j])
            acc += np.float32(dot) * block_scale[t, start // INT8_BLOCK]
        out[t, r] = acc * row_scale[r]


@njit(**_KERNEL)
def logits_int8(isa, table, row_scale, h, q, block_scale, out):
    """``out[t, r] ~ row_scale[r] * sum_j table[r, j] * h[t, j]`` for an int8 ``table`` ``(V, K)``.

    ``h`` is first quantized into ``q`` (int8, ``(n, K)``) and ``block_scale`` (float32,
    ``(n, ceil(K / INT8_BLOCK))``) by ``quantize_blocks`` in blocks of ``INT8_BLOCK``: the
    products are exact integers, each block's sum is scaled once. A token with NaN or Inf in
    ``h`` gets NaN logits. ``isa`` is a ``bitnet.kernels.simd`` marker.

    Rows go in two adjacent pairs (``_row_pair`` of ``2 g`` and ``2 g + 1``; the last alone
    when the pairs are odd, computed twice). Each row is computed by one thread in a fixed
    order, so the result does not depend on the number of threads.
    """
    for t in range(h.shape[0]):
        quantize_blocks(h, t, q, block_scale, INT8_BLOCK)
    vocab = table.shape[0]
    pairs = (vocab + 1) // 2
    for g in prange((pairs + 1) // 2):
        r0, r1 = _row_pair(2 * g, vocab)
        r2, r3 = _row_pair(min(2 * g + 1, pairs - 1), vocab)
        _int8_rows(isa, table, row_scale, q, block_scale, out, r0, r2, r1, r3)


@njit(cache=True, nogil=True)
def rows_words(word_format, table, ids, out):
    """``out[i] = float32(table[ids[i]])`` for a table of uint16 words in ``word_format``."""
    for i in range(ids.shape[0]):
        row = ids[i]  # read once: ``out`` might alias ``ids`` for all LLVM knows, which kept the loop scalar
        for j in range(table.shape[1]):
            out[i, j] = widen_word(word_format, table[row, j])


@njit(cache=True, nogil=True)
def rows_int8(table, row_scale, ids, out):
    """``out[i] = float32(table[ids[i]]) * row_scale[ids[i]]`` for an int8 table."""
    for i in range(ids.shape[0]):
        row = ids[i]
        scale = row_scale[row]
        for j in range(table.shape[1]):
            out[i, j] = np.float32(table[row, j]) * scale

"""Numba kernels for the embedding table used as the output head: ``logits = h @ table.T``.

The table is the biggest tensor of a BitNet model (128256 x 2560 for 2B4T) and is read
once per generated token, so these loops stream it once. bf16 rows arrive as raw uint16
words (a bf16 is the top half of a float32) and are widened to float32 in registers.

The int8 table is multiplied like llama.cpp's ``Q8_0 x Q8_0`` dot product: the hidden state
is quantized to int8 in blocks of ``INT8_BLOCK`` values, each with its own scale, so the
bytes meet in the CPU's byte multiply-adds (``vpdpbusd``) instead of being widened to float
one by one, which made the head compute bound at half the DRAM bandwidth (NOTES.md).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from ..kernels.quantize import quantize_blocks
from ..kernels.simd import (
    byte_vector_size,
    load_bytes,
    prefetch,
    scaled_add_floats,
    signed_dot_acc,
    sum_floats,
    zero_acc,
    zero_floats,
)

ROWS_PER_TASK = 64
INT8_BLOCK = 32  # hidden-state values per activation scale of the int8 head (ggml's Q8_0 block)
INT8_PREFETCH_ROWS = 4  # the int8 head prefetches the row this far ahead (2-4 stream best; NOTES.md)
# As in float_kernels: vectorizable reductions, IEEE NaN/Inf kept, numpy's division semantics.
_KERNEL = dict(parallel=True, fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy", cache=True,
               nogil=True, boundscheck=False)
_ROW_KERNEL = {**_KERNEL, "parallel": False, "inline": "always"}  # the body of one prange iteration


@njit(**_KERNEL)
def logits_bf16(table, h, out):
    """``out[t, r] = sum_j bf16(table[r, j]) * h[t, j]``; ``table`` is uint16 ``(V, K)``."""
    vocab, width = table.shape
    tasks = (vocab + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        widened = np.empty(width, np.uint32)
        row_float = widened.view(np.float32)
        for r in range(task * ROWS_PER_TASK, min(vocab, (task + 1) * ROWS_PER_TASK)):
            for j in range(width):
                widened[j] = np.uint32(table[r, j]) << 16
            for t in range(h.shape[0]):
                acc = np.float32(0.0)
                for j in range(width):
                    acc += row_float[j] * h[t, j]
                out[t, r] = acc


def _int8_row(isa, table, row_scale, q, lane_scale, out, r):
    """``out[t, r] = row_scale[r] * sum_j table[r, j] q[t, j] lane_scale[t, j // 4]``, one path per ISA."""


@overload(_int8_row, jit_options=_ROW_KERNEL)
def _int8_row_for(isa, table, row_scale, q, lane_scale, out, r):
    if isa.isa == "portable":
        return lambda isa, table, row_scale, q, lane_scale, out, r: _int8_row_portable(table, row_scale, q,
                                                                                        lane_scale, out, r)
    return lambda isa, table, row_scale, q, lane_scale, out, r: _int8_row_simd(isa, table, row_scale, q,
                                                                                lane_scale, out, r)


@njit(**_ROW_KERNEL)
def _int8_row_simd(isa, table, row_scale, q, lane_scale, out, r):
    """Each run of 4 values meets in one int32 lane of a byte dot product, then gets its block's scale.

    The row ``INT8_PREFETCH_ROWS`` ahead is prefetched first: the hardware prefetcher alone
    keeps too few lines in flight to stream the table at DRAM speed. The SIMD loads take flat
    indexes into the C-contiguous arrays: a ``reshape`` here would update the arrays'
    reference counts once per row from every thread, which cost a third of the time.
    """
    width = table.shape[1]
    step = byte_vector_size(isa)
    whole = width - width % step
    base = r * width
    for j in range(0, width, 64):
        prefetch(table, base + INT8_PREFETCH_ROWS * width + j)
    for t in range(q.shape[0]):
        total = zero_floats(isa)
        for j in range(0, whole, step):
            dots = signed_dot_acc(isa, zero_acc(isa), load_bytes(isa, table, base + j),
                                  load_bytes(isa, q, t * width + j))
            total = scaled_add_floats(total, dots, lane_scale, t * lane_scale.shape[1] + j // 4)
        acc = sum_floats(total)
        for j in range(whole, width):
            acc += np.float32(np.int32(table[r, j]) * np.int32(q[t, j])) * lane_scale[t, j // 4]
        out[t, r] = acc * row_scale[r]


@njit(**_ROW_KERNEL)
def _int8_row_portable(table, row_scale, q, lane_scale, out, r):
    """Plain loops for any CPU: an int32 dot product per block, then its scale."""
    width = table.shape[1]
    for t in range(q.shape[0]):
        acc = np.float32(0.0)
        for start in range(0, width, INT8_BLOCK):
            dot = np.int32(0)
            for j in range(start, min(width, start + INT8_BLOCK)):
                dot += np.int32(table[r, j]) * np.int32(q[t, j])
            acc += np.float32(dot) * lane_scale[t, start // 4]
        out[t, r] = acc * row_scale[r]


@njit(**_KERNEL)
def logits_int8(isa, table, row_scale, h, q, lane_scale, out):
    """``out[t, r] ~ row_scale[r] * sum_j table[r, j] * h[t, j]`` for an int8 ``table`` ``(V, K)``.

    ``h`` is first quantized into ``q`` (int8, ``(n, K)``) and ``lane_scale`` (float32,
    ``(n, ceil(K / 4))``) by ``quantize_blocks`` in blocks of ``INT8_BLOCK``: the products
    are exact integers, each block's sum is scaled once. A token with NaN or Inf in ``h``
    gets NaN logits. ``isa`` is a ``bitnet.kernels.simd`` marker. Each row is computed by
    one thread in a fixed order, so the result does not depend on the number of threads.
    """
    for t in range(h.shape[0]):
        quantize_blocks(h, t, q, lane_scale, INT8_BLOCK)
    for r in prange(table.shape[0]):
        _int8_row(isa, table, row_scale, q, lane_scale, out, r)


@njit(cache=True, nogil=True)
def rows_bf16(table, ids, out):
    """``out[i] = float32(table[ids[i]])`` for a uint16 bf16 table."""
    bits = out.view(np.uint32)
    for i in range(ids.shape[0]):
        for j in range(table.shape[1]):
            bits[i, j] = np.uint32(table[ids[i], j]) << 16

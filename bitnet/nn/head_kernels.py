"""Numba kernels for the embedding table used as the output head: ``logits = h @ table.T``.

The table is the biggest tensor of a BitNet model (128256 x 2560 for 2B4T) and is read
once per generated token, so these loops stream it once, converting each row to float32
in registers. bf16 rows arrive as raw uint16 words: a bf16 is the top half of a float32.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

ROWS_PER_TASK = 64
# As in float_kernels: vectorizable reductions, IEEE NaN/Inf kept, numpy's division semantics.
_KERNEL = dict(parallel=True, fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy", cache=True,
               nogil=True, boundscheck=False)


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


@njit(**_KERNEL)
def logits_int8(table, row_scale, h, out):
    """``out[t, r] = row_scale[r] * sum_j table[r, j] * h[t, j]``; ``table`` is int8 ``(V, K)``."""
    vocab, width = table.shape
    for r in prange(vocab):
        for t in range(h.shape[0]):
            acc = np.float32(0.0)
            for j in range(width):
                acc += np.float32(table[r, j]) * h[t, j]
            out[t, r] = acc * row_scale[r]


@njit(cache=True, nogil=True)
def rows_bf16(table, ids, out):
    """``out[i] = float32(table[ids[i]])`` for a uint16 bf16 table."""
    bits = out.view(np.uint32)
    for i in range(ids.shape[0]):
        for j in range(table.shape[1]):
            bits[i, j] = np.uint32(table[ids[i], j]) << 16

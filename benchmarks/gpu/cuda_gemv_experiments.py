"""Experimental variants of the CUDA decode kernel, timed by bench_cuda.py --experiments.

Not part of the library: each variant here is built from ``bitnet.cuda.kernels``' device
functions and must compute exactly what ``quantize_gemv`` does (bench_cuda checks that).
A variant that wins moves into ``bitnet/cuda/kernels.py``.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, int32

from bitnet.cuda.kernels import (
    CHUNK_WORDS,
    HELD_ACTIVATIONS,
    SHARED_INT32,
    THREADS,
    WARP,
    WARPS,
    chunk_dot,
    held_chunk_dot,
    hold_activations,
    load_chunk,
    quantize_token,
    scaled,
    warp_allsum,
)


@cuda.jit(device=True)
def finish_row(acc, i, rows_per_warp, lane, first, warps, mine, qsum, a, wscale, token, rows, out):
    """Reduce row ``i``'s sum into lane ``i % 32``; write the held rows every 32 rows and at the end."""
    total = warp_allsum(acc)
    if lane == i % WARP:
        mine = total
    if i % WARP == WARP - 1 or i == rows_per_warp - 1:
        own = first + (i - i % WARP + lane) * warps
        if lane <= i % WARP and own < rows:
            out[token, own] = scaled(mine - qsum, a, wscale[own])
    return mine


@cuda.jit(launch_bounds=(THREADS, 2))
def gemv_unrolled2(x, k, weights, wscale, rows_per_warp, out):
    """``quantize_gemv`` with the row loop unrolled by two: the chunk loaded for row i + 1 is
    consumed where it was loaded, so no register copy at the loop's end waits for the load."""
    qwords = cuda.shared.array(0, SHARED_INT32)
    amax_scratch = cuda.shared.array(WARPS, np.float32)
    sum_scratch = cuda.shared.array(WARPS, np.int32)
    held = cuda.local.array(HELD_ACTIVATIONS, np.int32)
    rows, words = weights.shape
    lane = cuda.threadIdx.x % WARP
    warps = cuda.blockDim.x // WARP
    first = cuda.blockIdx.x * warps * rows_per_warp + cuda.threadIdx.x // WARP
    token = cuda.blockIdx.y
    even = load_chunk(weights, first, lane)
    a, qsum = quantize_token(x[token], k, qwords, amax_scratch, sum_scratch)
    hold_activations(qwords, lane, held)
    mine = int32(0)
    i = 0
    while i < rows_per_warp:
        row = first + i * warps
        odd = load_chunk(weights, row + warps if i + 1 < rows_per_warp else rows, lane)
        acc = held_chunk_dot(even, held, int32(0))
        for start in range(CHUNK_WORDS + lane, words, CHUNK_WORDS):
            acc = chunk_dot(load_chunk(weights, row, start), start, words, qwords, acc)
        mine = finish_row(acc, i, rows_per_warp, lane, first, warps, mine, qsum, a, wscale, token, rows, out)
        if i + 1 < rows_per_warp:
            row = row + warps
            even = load_chunk(weights, row + warps if i + 2 < rows_per_warp else rows, lane)
            acc = held_chunk_dot(odd, held, int32(0))
            for start in range(CHUNK_WORDS + lane, words, CHUNK_WORDS):
                acc = chunk_dot(load_chunk(weights, row, start), start, words, qwords, acc)
            mine = finish_row(acc, i + 1, rows_per_warp, lane, first, warps, mine, qsum, a, wscale, token, rows, out)
        i += 2


@cuda.jit(device=True)
def load_row_chunk(wrow, first):
    """``load_chunk`` through a 1-D view of one row: the row offset is computed once per row."""
    words = wrow.shape[0]
    zero = np.uint32(0)
    return (
        wrow[first] if first < words else zero,
        wrow[first + WARP] if first + WARP < words else zero,
        wrow[first + 2 * WARP] if first + 2 * WARP < words else zero,
        wrow[first + 3 * WARP] if first + 3 * WARP < words else zero,
        wrow[first + 4 * WARP] if first + 4 * WARP < words else zero,
        wrow[first + 5 * WARP] if first + 5 * WARP < words else zero,
        wrow[first + 6 * WARP] if first + 6 * WARP < words else zero,
        wrow[first + 7 * WARP] if first + 7 * WARP < words else zero,
    )


@cuda.jit(launch_bounds=(THREADS, 2))
def gemv_rowview_unrolled2(x, k, weights, wscale, rows_per_warp, out):
    """``gemv_unrolled2`` loading through 1-D row views (rows past the matrix read as zeros)."""
    qwords = cuda.shared.array(0, SHARED_INT32)
    amax_scratch = cuda.shared.array(WARPS, np.float32)
    sum_scratch = cuda.shared.array(WARPS, np.int32)
    held = cuda.local.array(HELD_ACTIVATIONS, np.int32)
    rows, words = weights.shape
    lane = cuda.threadIdx.x % WARP
    warps = cuda.blockDim.x // WARP
    first = cuda.blockIdx.x * warps * rows_per_warp + cuda.threadIdx.x // WARP
    token = cuda.blockIdx.y
    even = load_row_chunk(weights[min(first, rows - 1)], lane if first < rows else words)
    a, qsum = quantize_token(x[token], k, qwords, amax_scratch, sum_scratch)
    hold_activations(qwords, lane, held)
    mine = int32(0)
    i = 0
    while i < rows_per_warp:
        row = first + i * warps
        nxt = row + warps
        odd = load_row_chunk(weights[min(nxt, rows - 1)], lane if nxt < rows and i + 1 < rows_per_warp else words)
        acc = held_chunk_dot(even, held, int32(0))
        for start in range(CHUNK_WORDS + lane, words, CHUNK_WORDS):
            acc = chunk_dot(load_chunk(weights, row, start), start, words, qwords, acc)
        mine = finish_row(acc, i, rows_per_warp, lane, first, warps, mine, qsum, a, wscale, token, rows, out)
        if i + 1 < rows_per_warp:
            row = nxt
            nxt = row + warps
            even = load_row_chunk(weights[min(nxt, rows - 1)], lane if nxt < rows and i + 2 < rows_per_warp else words)
            acc = held_chunk_dot(odd, held, int32(0))
            for start in range(CHUNK_WORDS + lane, words, CHUNK_WORDS):
                acc = chunk_dot(load_chunk(weights, row, start), start, words, qwords, acc)
            mine = finish_row(acc, i + 1, rows_per_warp, lane, first, warps, mine, qsum, a, wscale, token, rows, out)
        i += 2


VARIANTS = {"unrolled2": gemv_unrolled2, "rowview": gemv_rowview_unrolled2}

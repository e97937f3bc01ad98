"""Numba kernels for causal attention over a key/value cache held in float32 or float16.

A float16 cache arrives as raw uint16 words (Numba has no float16 on the CPU): keys and
values are rounded to f16 once, when rope writes them (``vcvtps2ph``), and widened back
exactly in registers when attention reads them (``vcvtph2ps``). The same source compiles for
either cache dtype; :func:`stored` and :func:`store` are the only places that differ.

Attention splits its work into items of one key/value head, one query and one chunk of
positions. All query heads that share a key/value head (GQA) are served by the same item,
so each cached row is read once per step, not once per query head. Within a chunk,
positions go by tiles with a running max and sum (online softmax), so the scratch per item
is one tile of scores whatever the context. The chunks of a query are then combined in a
fixed order. The chunk length depends on the number of queries only (``chunk_length``),
never on the thread count, so any thread count gives the same bits.

The arithmetic is HF transformers' float32 attention: ``softmax(q k^T * scaling) v`` with
rope as ``x * cos + rotate_half(x) * sin``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .simd import F16_WORDS, narrow_to_f16, widen_word
from .variants import serial_and_parallel
from .vector_math import exp32, max32

# Reassociation lets the dot products vectorize; no "nnan"/"ninf" (a NaN must stay NaN), and
# numpy's error model so a division by zero gives inf/NaN instead of raising.
_KERNEL = dict(fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy", cache=True, nogil=True,
               boundscheck=False)

TILE = 32  # positions scored at once within an item: the scores of a tile stay in L1
DECODE_CHUNK = 256  # positions per item when queries are few (decode): a long context splits over threads
FEW_QUERIES = 8  # below this many queries the positions are chunked; above, queries give enough items
# Attention over this many positions is worth threads even for one query: in a decode step the
# cache comes back from DRAM (the weights evicted it), and two threads read it faster.
PARALLEL_MIN_CONTEXT = 64


def stored(value):
    """A cached value as float32: itself for a float32 cache, widened for a float16 (uint16) one."""


@overload(stored, inline="always")
def _stored(value):
    if value == types.float32:
        return lambda value: value
    if value == types.uint16:
        return lambda value: widen_word(F16_WORDS, value)
    return None


def store(row, j, value):
    """``row[j] = value`` (float32), rounded to f16 when ``row`` is a float16 (uint16) cache row."""


@overload(store, inline="always")
def _store(row, j, value):
    if row.dtype == types.float32:
        def write(row, j, value):
            row[j] = value
    elif row.dtype == types.uint16:
        def write(row, j, value):
            row[j] = narrow_to_f16(value)
    else:
        return None
    return write


@njit(**_KERNEL)
def _rotate(src, cos, sin, pos, dst):
    """Rotate one head vector: ``dst = src * cos + rotate_half(src) * sin`` at position ``pos``."""
    half = src.shape[0] // 2
    for j in range(half):
        first, second = src[j], src[half + j]
        store(dst, j, first * cos[pos, j] - second * sin[pos, j])
        store(dst, half + j, second * cos[pos, half + j] + first * sin[pos, half + j])


@njit(**_KERNEL)
def rope_into_cache(qkv, heads, kv_heads, cos, sin, start, queries, keys, values):
    """Split fused q|k|v rows, rotate q and k, and append k and v to the cache at ``start``.

    ``qkv``: ``(n, (heads + 2 kv_heads) d)``; ``queries``: ``(n, heads, d)`` float32 output;
    ``keys``/``values``: ``(kv_heads, capacity, d)`` caches (float32 or f16 words), rows
    ``start .. start + n`` written.
    """
    n = qkv.shape[0]
    d = queries.shape[2]
    k_base, v_base = heads * d, (heads + kv_heads) * d
    for i in range(n):
        pos = start + i
        for h in range(heads):
            _rotate(qkv[i, h * d : (h + 1) * d], cos, sin, pos, queries[i, h])
        for h in range(kv_heads):
            _rotate(qkv[i, k_base + h * d : k_base + (h + 1) * d], cos, sin, pos, keys[h, pos])
            row = values[h, pos]
            for j in range(d):
                store(row, j, qkv[i, v_base + h * d + j])


def chunk_length(queries: int, capacity: int) -> int:
    """Positions per work item for ``queries`` queries over a cache of ``capacity`` positions."""
    return DECODE_CHUNK if queries < FEW_QUERIES else max(capacity, 1)


def scratch_shapes(queries: int, heads: int, kv_heads: int, head_dim: int, capacity: int) -> dict[str, tuple]:
    """Shapes of the float32 scratch :func:`causal_attention` takes, by argument name."""
    chunks = -(-capacity // chunk_length(queries, capacity))
    group = heads // kv_heads
    return {"scores": (queries * kv_heads * chunks, group, TILE), "chunk_max": (queries, heads, chunks),
            "chunk_sum": (queries, heads, chunks), "chunk_context": (queries, heads, chunks, head_dim)}


@njit(**_KERNEL)
def _row_max(row, count, start):
    """``max(start, row[:count])`` with vector max instructions (``max32``).

    A NaN score may or may not become the max, but it makes its own weight NaN either way,
    so the output is NaN as in float32 attention.
    """
    top = start
    for t in range(count):
        top = max32(top, row[t])
    return top


@njit(**_KERNEL)
def _tile_scores(queries, i, h, count, keys, kv, t0, t1, scaling, tile_scores, g):
    """``tile_scores[g + x, t - t0] = scaling * queries[i, h + x] . keys[kv, t]`` for ``x < count``
    (4 or 1) and positions ``t0 .. t1``.

    Four heads take two positions per pass over the rows: each key row is widened once for
    all four heads, and each query element loaded once per two positions.
    """
    d = queries.shape[2]
    if count == 4:
        t = t0
        while t + 2 <= t1:
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            for j in range(d):
                k, m = stored(keys[kv, t, j]), stored(keys[kv, t + 1, j])
                q0, q1, q2, q3 = queries[i, h, j], queries[i, h + 1, j], queries[i, h + 2, j], queries[i, h + 3, j]
                a0 += q0 * k
                a1 += q1 * k
                a2 += q2 * k
                a3 += q3 * k
                b0 += q0 * m
                b1 += q1 * m
                b2 += q2 * m
                b3 += q3 * m
            s = t - t0
            tile_scores[g, s], tile_scores[g, s + 1] = a0 * scaling, b0 * scaling
            tile_scores[g + 1, s], tile_scores[g + 1, s + 1] = a1 * scaling, b1 * scaling
            tile_scores[g + 2, s], tile_scores[g + 2, s + 1] = a2 * scaling, b2 * scaling
            tile_scores[g + 3, s], tile_scores[g + 3, s + 1] = a3 * scaling, b3 * scaling
            t += 2
        if t < t1:  # an odd last position
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for j in range(d):
                k = stored(keys[kv, t, j])
                a0 += queries[i, h, j] * k
                a1 += queries[i, h + 1, j] * k
                a2 += queries[i, h + 2, j] * k
                a3 += queries[i, h + 3, j] * k
            tile_scores[g, t - t0], tile_scores[g + 1, t - t0] = a0 * scaling, a1 * scaling
            tile_scores[g + 2, t - t0], tile_scores[g + 3, t - t0] = a2 * scaling, a3 * scaling
    else:
        for t in range(t0, t1):
            a0 = np.float32(0.0)
            for j in range(d):
                a0 += queries[i, h, j] * stored(keys[kv, t, j])
            tile_scores[g, t - t0] = a0 * scaling


@njit(**_KERNEL)
def _tile_context(tile_scores, g, count, values, kv, t0, t1, chunk_context, i, h, c):
    """``chunk_context[i, h + x, c] += tile_scores[g + x, t - t0] * values[kv, t]`` for ``x < count``
    (4 or 1) and positions ``t0 .. t1``.

    Four heads take four positions per pass over the context rows, so each value row is
    widened once for all four heads and each context element is loaded and stored once per
    four positions, not once per position (the stores were the bottleneck).
    """
    d = values.shape[2]
    if count == 4:
        t = t0
        while t + 4 <= t1:
            # Weights in scalars: read through an array inside the loop, LLVM could not prove they
            # do not alias the context rows and fell back to scalar code (4x slower).
            s = t - t0
            p00, p01, p02, p03 = tile_scores[g, s], tile_scores[g, s + 1], tile_scores[g, s + 2], tile_scores[g, s + 3]
            p10, p11, p12, p13 = (tile_scores[g + 1, s], tile_scores[g + 1, s + 1], tile_scores[g + 1, s + 2],
                                  tile_scores[g + 1, s + 3])
            p20, p21, p22, p23 = (tile_scores[g + 2, s], tile_scores[g + 2, s + 1], tile_scores[g + 2, s + 2],
                                  tile_scores[g + 2, s + 3])
            p30, p31, p32, p33 = (tile_scores[g + 3, s], tile_scores[g + 3, s + 1], tile_scores[g + 3, s + 2],
                                  tile_scores[g + 3, s + 3])
            for j in range(d):
                v0, v1, v2, v3 = (stored(values[kv, t, j]), stored(values[kv, t + 1, j]),
                                  stored(values[kv, t + 2, j]), stored(values[kv, t + 3, j]))
                chunk_context[i, h, c, j] += p00 * v0 + p01 * v1 + p02 * v2 + p03 * v3
                chunk_context[i, h + 1, c, j] += p10 * v0 + p11 * v1 + p12 * v2 + p13 * v3
                chunk_context[i, h + 2, c, j] += p20 * v0 + p21 * v1 + p22 * v2 + p23 * v3
                chunk_context[i, h + 3, c, j] += p30 * v0 + p31 * v1 + p32 * v2 + p33 * v3
            t += 4
        while t < t1:
            p0, p1, p2, p3 = (tile_scores[g, t - t0], tile_scores[g + 1, t - t0], tile_scores[g + 2, t - t0],
                              tile_scores[g + 3, t - t0])
            for j in range(d):
                v = stored(values[kv, t, j])
                chunk_context[i, h, c, j] += p0 * v
                chunk_context[i, h + 1, c, j] += p1 * v
                chunk_context[i, h + 2, c, j] += p2 * v
                chunk_context[i, h + 3, c, j] += p3 * v
            t += 1
    else:
        for t in range(t0, t1):
            p0 = tile_scores[g, t - t0]
            for j in range(d):
                chunk_context[i, h, c, j] += p0 * stored(values[kv, t, j])


def causal_attention(queries, keys, values, start, scaling, chunk, scores, chunk_max, chunk_sum, chunk_context,
                     out):
    """Softmax attention of each query over cache positions ``0 .. start + i`` (causal).

    ``queries``: ``(n, heads, d)``, query ``i`` at position ``start + i``; ``keys``/``values``:
    ``(kv_heads, capacity, d)``, query head ``h`` reading kv head ``h // (heads / kv_heads)``;
    ``chunk``: positions per item (:func:`chunk_length`); the scratch as :func:`scratch_shapes`
    gives it; ``out``: ``(n, heads * d)``.
    """
    n, heads, d = queries.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    chunks = chunk_max.shape[2]
    scaling = np.float32(scaling)  # a Python float would turn the dot products into float64 (3x slower)
    for item in prange(n * kv_heads * chunks):
        i = item // (kv_heads * chunks)
        kv = item // chunks % kv_heads
        c = item % chunks
        first_head = kv * group
        lo = c * chunk
        hi = min(lo + chunk, start + i + 1)
        tile_scores = scores[item]
        for g in range(group):
            chunk_max[i, first_head + g, c] = -np.inf
            chunk_sum[i, first_head + g, c] = 0.0
            for j in range(d):
                chunk_context[i, first_head + g, c, j] = 0.0
        for t0 in range(lo, hi, TILE):
            t1 = min(t0 + TILE, hi)
            g = 0
            while g < group:  # four heads at a time read each cached row once; the rest one by one
                count = 4 if g + 4 <= group else 1
                _tile_scores(queries, i, first_head + g, count, keys, kv, t0, t1, scaling, tile_scores, g)
                g += count
            for g in range(group):
                h = first_head + g
                top = _row_max(tile_scores[g], t1 - t0, chunk_max[i, h, c])
                rescale = exp32(chunk_max[i, h, c] - top)
                total = chunk_sum[i, h, c] * rescale
                for t in range(t1 - t0):
                    p = exp32(tile_scores[g, t] - top)
                    tile_scores[g, t] = p
                    total += p
                chunk_max[i, h, c] = top
                chunk_sum[i, h, c] = total
                for j in range(d):
                    chunk_context[i, h, c, j] *= rescale
            g = 0
            while g < group:
                count = 4 if g + 4 <= group else 1
                _tile_context(tile_scores, g, count, values, kv, t0, t1, chunk_context, i, first_head + g, c)
                g += count
    for row in prange(n * heads):
        i, h = row // heads, row % heads
        top = np.float32(-np.inf)
        for c in range(chunks):
            top = max(top, chunk_max[i, h, c])
        result = out[i, h * d : (h + 1) * d]
        result[:] = 0.0
        total = np.float32(0.0)
        for c in range(chunks):
            weight = exp32(chunk_max[i, h, c] - top)
            total += weight * chunk_sum[i, h, c]
            for j in range(d):
                result[j] += weight * chunk_context[i, h, c, j]
        inv = np.float32(1.0) / total
        for j in range(d):
            result[j] *= inv


serial, parallel = serial_and_parallel((causal_attention,), **_KERNEL)


def for_attention(n: int, context: int) -> SimpleNamespace:
    """The kernel build for attention of ``n`` queries over ``context`` positions."""
    return parallel if n >= FEW_QUERIES or context >= PARALLEL_MIN_CONTEXT else serial

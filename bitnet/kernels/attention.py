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
            chunk_context[i, first_head + g, c, :] = 0.0
        for t0 in range(lo, hi, TILE):
            t1 = min(t0 + TILE, hi)
            for t in range(t0, t1):
                for g in range(group):
                    acc = np.float32(0.0)
                    for j in range(d):
                        acc += queries[i, first_head + g, j] * stored(keys[kv, t, j])
                    tile_scores[g, t - t0] = acc * scaling
            for g in range(group):
                h = first_head + g
                top = chunk_max[i, h, c]
                for t in range(t1 - t0):
                    top = max(top, tile_scores[g, t])
                rescale = np.exp(chunk_max[i, h, c] - top)
                total = chunk_sum[i, h, c] * rescale
                for t in range(t1 - t0):
                    p = np.exp(tile_scores[g, t] - top)
                    tile_scores[g, t] = p
                    total += p
                chunk_max[i, h, c] = top
                chunk_sum[i, h, c] = total
                context = chunk_context[i, h, c]
                for j in range(d):
                    context[j] *= rescale
            for t in range(t0, t1):
                for g in range(group):
                    p = tile_scores[g, t - t0]
                    context = chunk_context[i, first_head + g, c]
                    for j in range(d):
                        context[j] += p * stored(values[kv, t, j])
    for row in prange(n * heads):
        i, h = row // heads, row % heads
        top = np.float32(-np.inf)
        for c in range(chunks):
            top = max(top, chunk_max[i, h, c])
        result = out[i, h * d : (h + 1) * d]
        result[:] = 0.0
        total = np.float32(0.0)
        for c in range(chunks):
            weight = np.exp(chunk_max[i, h, c] - top)
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

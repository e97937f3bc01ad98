"""Numba kernels for causal attention over a key/value cache held in float32 or float16.

A float16 cache arrives as raw uint16 words (Numba has no float16 on the CPU): keys and
values are rounded to f16 once, when rope writes them (``vcvtps2ph``), and widened back
exactly in registers when attention reads them (``vcvtph2ps``). The same source compiles for
either cache dtype; :func:`stored`, :func:`store` and :func:`cache_format` are the only places
that differ.

The kernels take the rows of a step from any number of sequences at once, each with its own
cache: a table of query rows (``rows``: the row, its cache, its position, its chunk length)
and a table of caches (``tables``: per cache and layer, the addresses of the keys and values
and the capacity, from :func:`address_table`). One call per layer serves a whole batch, so a
decode step of 8 sequences wakes the threads once per layer, not 8 times, and reads the 8
caches in parallel. The callers (``bitnet.nn.attention``) check every cache before a step.

Attention splits its work into items of one key/value head, one query and one chunk of
positions. All query heads that share a key/value head (GQA) are served by the same item,
so each cached row is read once per step, not once per query head. Within a chunk,
positions go by tiles with a running max and sum (online softmax), so the scratch per item
is one tile of scores whatever the context. The chunks of a query are then combined in a
fixed order (by the item itself when a call has one chunk per query, saving a second parallel
region). The chunk length depends on the number of queries of the row's own sequence
only (``chunk_length``), never on the thread count or the other sequences, so any thread
count and any batch give the same bits; the sums that set those bits are compiled with strict
float math (``_STRICT``), so a kernel loaded from Numba's cache gives them too.

With AVX-512 the 4 heads of a key/value head (GQA's usual group) go by register blocks built
from ``simd``: scores 4 positions at a time, summed across lanes by one shuffle tree, and the
context with its sums in registers over a whole tile, prefetching the cache into L2 as they
go. Elsewhere (other groups, head sizes that are not whole vectors, AVX2's 16 registers and
the portable path) plain loops that LLVM vectorizes compute the same values (to float
rounding: the sums go in another order). Each kernel path has its entry in ``ENTRY_POINTS``.

The arithmetic is HF transformers' float32 attention: ``softmax(q k^T * scaling) v`` with
rope as ``x * cos + rotate_half(x) * sin``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.core.registry import CPUDispatcher
from numba.extending import overload

from .addresses import array_at
from .rows import threaded as rows_threaded
from .simd import (
    F16_WORDS,
    F32_VALUES,
    MARKERS,
    IsaMarker,
    add_floats,
    add_products,
    byte_vector_size,
    lane_totals,
    load_floats,
    load_four_floats,
    mul_floats,
    narrow_to_f16,
    prefetch,
    splat_floats,
    store_four_floats,
    store_fours,
    sum_floats,
    widen_four_words,
    widen_word,
    widen_words,
    zero_floats,
)
from .variants import serial_and_parallel
from .vector_math import exp32, max32

# Reassociation lets the dot products vectorize; no "nnan"/"ninf" (a NaN must stay NaN), and
# numpy's error model so a division by zero gives inf/NaN instead of raising.
_KERNEL = dict(fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy", cache=True, nogil=True,
               boundscheck=False)
# The sums whose order sets the bits of a result (a softmax's, the chunks' combination) are compiled
# on their own with strict float math, as ``exp32`` is: under "reassoc" and "contract" the softmax
# sum of the threaded kernel came out 1 ulp apart (in ~10% of heads) between a fresh build and the
# same kernel loaded from Numba's cache (NOTES.md). Strict functions keep their flags when inlined.
_STRICT = dict(error_model="numpy", cache=True, nogil=True, boundscheck=False)

# Positions scored at once within an item: a tile's scores (4 heads x 128 floats, 2 KB) stay in L1,
# and each tile costs a softmax pass per head and a load and store of the context's accumulators,
# so longer tiles cost less: 128 against 32 took a 2048-position decode's attention from 8-9 to
# 6.6-7.3 ms and a 256-query prefill from 6.3-6.5 to 5.4-5.5 ms (NOTES.md).
TILE = 128
DECODE_CHUNK = 256  # positions per item when queries are few (decode): a long context splits over threads
FEW_QUERIES = 8  # below this many queries the positions are chunked; above, queries give enough items
# Attention over this many positions (query rows x context) is worth threads, even for one query:
# in a decode step the caches come back from DRAM (the weights evicted them), and two threads
# read them faster.
PARALLEL_MIN_CONTEXT = 64
# The register blocks prefetch (into L2) the keys this many bytes past the rows they score, and the values
# of those rows (the tile's context reads them next), and the context blocks the values this far past
# theirs, spread over their loops: the CPU drops prefetches issued in a burst (NOTES.md). Each item first
# prefetches its first this many bytes of keys, so the stream runs unbroken from its first row: with
# 16 KB ahead and a 4 KB start, the rows between were missed, and a decode step's short chunks
# (64-256 positions) waited on DRAM for most of their keys (4 KB against 16 KB: attention 0.64-0.67
# against 0.90-0.96 ms at 64 positions, the same at 2048).
CACHE_PREFETCH_BYTES = 4096


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


# Columns of the tables the kernels take: ``rows`` (one per query) and ``tables`` (per cache and layer).
ROW, CACHE, POSITION, CHUNK = range(4)
KEYS, VALUES, CAPACITY = range(3)


def address_table(keys: list[np.ndarray], values: list[np.ndarray]) -> np.ndarray:
    """One cache's row of ``tables``: per layer the addresses of its keys and values (C-contiguous
    ``(kv_heads, capacity, d)`` arrays, kept alive by the cache) and its capacity; int64 ``(layers, 3)``."""
    table = np.empty((len(keys), 3), np.int64)
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        table[layer] = k.ctypes.data, v.ctypes.data, k.shape[1]
    return table


def query_rows(sequences: list[tuple[int, int, int]], capacity: int) -> np.ndarray:
    """``rows`` for sequences given as ``(first row, cached positions, new rows)`` each, the cache
    index being the sequence's place in the list: int64 ``(rows, 4)``. ``capacity``: the largest
    capacity among their caches."""
    rows = np.empty((sum(n for _, _, n in sequences), 4), np.int64)
    done = 0
    for cache, (first, start, n) in enumerate(sequences):
        part = rows[done : done + n]
        part[:, ROW] = np.arange(first, first + n)
        part[:, CACHE] = cache
        part[:, POSITION] = np.arange(start, start + n)
        part[:, CHUNK] = chunk_length(n, capacity)
        done += n
    return rows


def cache_template(kv_heads: int, head_dim: int, dtype: np.dtype) -> np.ndarray:
    """An empty array of the kernels' cache dtype (float32, or uint16 words for float16) and layout:
    the kernels see the caches of ``tables`` as arrays of its type."""
    return np.empty((kv_heads, 0, head_dim), np.uint16 if dtype == np.float16 else dtype)


def single_sequence(keys: np.ndarray, values: np.ndarray, start: int, n: int) -> tuple[np.ndarray, ...]:
    """``(rows, tables, template)`` for ``n`` query rows from position ``start`` over one cache layer
    given as the kernels' arrays (``keys``/``values`` ``(kv_heads, capacity, d)``, read as layer 0;
    the caller keeps them alive): the kernels on bare arrays, as tests and benchmarks call them."""
    capacity = keys.shape[1]
    template = cache_template(keys.shape[0], keys.shape[2], keys.dtype)
    return query_rows([(0, start, n)], capacity), address_table([keys], [values])[None], template


@njit(**_KERNEL, inline="always")
def _cache_layer(tables, cache, layer, which, template):
    """Keys (``which`` = KEYS) or values of cache ``cache`` at ``layer``: ``(kv_heads, capacity, d)``."""
    shape = (template.shape[0], tables[cache, layer, CAPACITY], template.shape[2])
    return array_at(tables[cache, layer, which], shape, template)


@njit(**_KERNEL)
def _rotate(src, cos, sin, pos, dst):
    """Rotate one head vector: ``dst = src * cos + rotate_half(src) * sin`` at position ``pos``."""
    half = src.shape[0] // 2
    for j in range(half):
        first, second = src[j], src[half + j]
        store(dst, j, first * cos[pos, j] - second * sin[pos, j])
        store(dst, half + j, second * cos[pos, half + j] + first * sin[pos, half + j])


def rope_into_caches(qkv, heads, kv_heads, cos, sin, rows, tables, layer, template, queries):
    """Split fused q|k|v rows, rotate q and k, and append k and v to each row's cache at its position.

    ``qkv``: ``(n, (heads + 2 kv_heads) d)``; ``queries``: ``(n, heads, d)`` float32 output;
    ``rows``, ``tables``, ``template``: as :func:`causal_attention` takes them. Compiled serial
    and threaded (``for_rope``); each row is written by one thread.
    """
    d = queries.shape[2]
    k_base, v_base = heads * d, (heads + kv_heads) * d
    for r in prange(rows.shape[0]):
        i, pos = rows[r, ROW], rows[r, POSITION]
        keys = _cache_layer(tables, rows[r, CACHE], layer, KEYS, template)
        values = _cache_layer(tables, rows[r, CACHE], layer, VALUES, template)
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


def scratch_shapes(queries: int, chunk: int, heads: int, kv_heads: int, head_dim: int,
                   capacity: int) -> dict[str, tuple]:
    """Shapes of the float32 scratch :func:`causal_attention` takes, by argument name, for ``queries``
    rows whose shortest chunk length is ``chunk``, over caches of at most ``capacity`` positions."""
    chunks = -(-capacity // chunk)
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
def _tile_scores(queries, i, h, count, keys, kv, origin, t0, t1, scaling, tile_scores, g):
    """``tile_scores[g + x, t - origin] = scaling * queries[i, h + x] . keys[kv, t]`` for ``x < count``
    (4 or 1) and positions ``t0 .. t1``, in plain loops that LLVM vectorizes along ``d``.

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
            s = t - origin
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
            tile_scores[g, t - origin], tile_scores[g + 1, t - origin] = a0 * scaling, a1 * scaling
            tile_scores[g + 2, t - origin], tile_scores[g + 3, t - origin] = a2 * scaling, a3 * scaling
    else:
        for t in range(t0, t1):
            a0 = np.float32(0.0)
            for j in range(d):
                a0 += queries[i, h, j] * stored(keys[kv, t, j])
            tile_scores[g, t - origin] = a0 * scaling


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


def _whole_vectors_sum(isa, row, count):
    """``(sum, covered)``: the sum of ``row``'s first ``covered`` values, the most whole vectors of
    ``count``, by lanes (lane ``l`` adds positions ``l``, ``l + lanes``, ...) and then ``sum_floats``'
    fixed tree; ``(0, 0)`` on the portable path."""


@overload(_whole_vectors_sum, jit_options=_STRICT)
def _whole_vectors_sum_for(isa, row, count):
    if isa.vector_bytes == 0 or row.layout != "C":
        return lambda isa, row, count: (np.float32(0.0), 0)

    def by_lanes(isa, row, count):
        step = byte_vector_size(isa) // 4
        lanes = zero_floats(isa)
        t = 0
        while t + step <= count:
            lanes = add_floats(lanes, load_floats(isa, row, t))
            t += step
        return sum_floats(lanes), t
    return by_lanes


@njit(**_STRICT)
def _exponentials(isa, row, count, top, carried, rescale):
    """``row[t] = e**(row[t] - top)`` for ``t < count``, returning ``carried * rescale`` plus their sum:
    the whole vectors' by ``_whole_vectors_sum``, then the positions past them in order."""
    for t in range(count):
        row[t] = exp32(row[t] - top)
    total, t = _whole_vectors_sum(isa, row, count)
    while t < count:
        total += row[t]
        t += 1
    return carried * rescale + total


def cache_format(cache):
    """The ``simd.WordFormat`` a cache array holds: f16 words (uint16) or float32 values."""


@overload(cache_format, inline="always")
def _cache_format(cache):
    word_format = F16_WORDS if cache.dtype == types.uint16 else F32_VALUES
    return lambda cache: word_format


def _vector_blocks(isa, *arrays) -> bool:
    """Whether the register blocks below compile for ``isa`` and these arrays: AVX-512 (their 16
    accumulators and the operands need 21 of its 32 vector registers; AVX2 has 16) and
    C-contiguous arrays (the vector loads address flat elements)."""
    return isa.vector_bytes == 64 and all(a.layout == "C" for a in arrays)


@njit(**_KERNEL)
def _scores_4x4(isa, queries, i, h, keys, values, kv, t, scaling, tile_scores, g, s):
    """``tile_scores[g + x, s + p] = scaling * queries[i, h + x] . keys[kv, t + p]`` for 4 heads and
    4 positions (``d`` a multiple of the vector lanes).

    16 vector accumulators, one per head and position: each key vector is widened once for 4
    heads and each query vector loaded once for 4 positions, and the 16 dot products are
    summed across lanes by one shuffle tree (``lane_totals``) instead of 16 reductions.
    """
    heads, d = queries.shape[1], queries.shape[2]
    step = byte_vector_size(isa) // 4
    word_format = cache_format(keys)
    q0 = (i * heads + h) * d  # flat index of queries[i, h, 0]
    k0 = (kv * keys.shape[1] + t) * d  # of keys[kv, t, 0]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = zero_floats(isa)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = zero_floats(isa)
    ahead = k0 + CACHE_PREFETCH_BYTES // keys.itemsize
    line = 64 // keys.itemsize
    for j in range(0, d, step):
        for e in range(0, 4 * step, line):  # the next blocks' keys, as many lines as this step reads,
            prefetch(keys, ahead + 4 * j + e)
            prefetch(values, k0 + 4 * j + e)  # and these positions' values (same layout), read next
        k_0 = widen_words(isa, word_format, keys, k0 + j)
        k_1 = widen_words(isa, word_format, keys, k0 + d + j)
        k_2 = widen_words(isa, word_format, keys, k0 + 2 * d + j)
        k_3 = widen_words(isa, word_format, keys, k0 + 3 * d + j)
        a00, a01, a02, a03 = _add_times(load_floats(isa, queries, q0 + j), k_0, k_1, k_2, k_3,
                                        a00, a01, a02, a03)
        a10, a11, a12, a13 = _add_times(load_floats(isa, queries, q0 + d + j), k_0, k_1, k_2, k_3,
                                        a10, a11, a12, a13)
        a20, a21, a22, a23 = _add_times(load_floats(isa, queries, q0 + 2 * d + j), k_0, k_1, k_2, k_3,
                                        a20, a21, a22, a23)
        a30, a31, a32, a33 = _add_times(load_floats(isa, queries, q0 + 3 * d + j), k_0, k_1, k_2, k_3,
                                        a30, a31, a32, a33)
    totals = lane_totals((a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33))
    store_fours(tile_scores, g * tile_scores.shape[1] + s, tile_scores.shape[1],
                mul_floats(totals, splat_floats(isa, scaling)))  # lane 4 x + p: head x, position p


@njit(**_KERNEL)
def _context_4(isa, tile_scores, g, values, kv, t0, t1, chunk_context, i, h, c):
    """``chunk_context[i, h + x, c] += tile_scores[g + x, t - t0] * values[kv, t]`` for 4 heads and
    positions ``t0 .. t1`` (``d`` a multiple of 4 vectors).

    ``d`` goes by 4 vectors at a time, whose sums for the 4 heads (16 accumulators) stay in
    registers over all the tile's positions: each value vector is widened once for 4 heads,
    and the context is loaded and stored once per tile instead of once per few positions.
    """
    heads, chunks, d = chunk_context.shape[1], chunk_context.shape[2], chunk_context.shape[3]
    step = byte_vector_size(isa) // 4
    word_format = cache_format(values)
    between_heads = chunks * d  # flat distance from chunk_context[i, h, c, j] to [i, h + 1, c, j]
    ahead = CACHE_PREFETCH_BYTES // values.itemsize
    line = 64 // values.itemsize
    for j in range(0, d, 4 * step):
        o0 = ((i * heads + h) * chunks + c) * d + j
        o1, o2, o3 = o0 + between_heads, o0 + 2 * between_heads, o0 + 3 * between_heads
        c00, c01, c02, c03 = load_four_floats(isa, chunk_context, o0)
        c10, c11, c12, c13 = load_four_floats(isa, chunk_context, o1)
        c20, c21, c22, c23 = load_four_floats(isa, chunk_context, o2)
        c30, c31, c32, c33 = load_four_floats(isa, chunk_context, o3)
        for t in range(t0, t1):
            v = (kv * values.shape[1] + t) * d + j  # flat index of values[kv, t, j]
            for e in range(0, 4 * step, line):
                prefetch(values, v + ahead + e)
            v0, v1, v2, v3 = widen_four_words(isa, word_format, values, v)
            s = t - t0
            c00, c01, c02, c03 = _add_times(splat_floats(isa, tile_scores[g, s]), v0, v1, v2, v3,
                                              c00, c01, c02, c03)
            c10, c11, c12, c13 = _add_times(splat_floats(isa, tile_scores[g + 1, s]), v0, v1, v2, v3,
                                              c10, c11, c12, c13)
            c20, c21, c22, c23 = _add_times(splat_floats(isa, tile_scores[g + 2, s]), v0, v1, v2, v3,
                                              c20, c21, c22, c23)
            c30, c31, c32, c33 = _add_times(splat_floats(isa, tile_scores[g + 3, s]), v0, v1, v2, v3,
                                              c30, c31, c32, c33)
        store_four_floats(isa, chunk_context, o0, c00, c01, c02, c03)
        store_four_floats(isa, chunk_context, o1, c10, c11, c12, c13)
        store_four_floats(isa, chunk_context, o2, c20, c21, c22, c23)
        store_four_floats(isa, chunk_context, o3, c30, c31, c32, c33)


@njit(**_KERNEL, inline="always")
def _add_times(x, v0, v1, v2, v3, a0, a1, a2, a3):
    """``a + x * v`` for a row of 4 accumulators: one vector ``x`` (a query's, or a weight in every
    lane) times 4 vectors ``v`` (4 keys, or 4 vectors of a value row)."""
    return add_products(a0, x, v0), add_products(a1, x, v1), add_products(a2, x, v2), add_products(a3, x, v3)


def _scores(isa, queries, i, h, count, keys, values, kv, t0, t1, scaling, tile_scores, g):
    """``tile_scores[g + x, t - t0] = scaling * queries[i, h + x] . keys[kv, t]`` for ``x < count``
    (4 or 1) and positions ``t0 .. t1``: 4 heads by register blocks of 4 positions where
    ``_vector_blocks`` allows, the rest by plain loops."""


@overload(_scores, jit_options=_KERNEL)
def _scores_for(isa, queries, i, h, count, keys, values, kv, t0, t1, scaling, tile_scores, g):
    if not _vector_blocks(isa, queries, keys):
        return lambda isa, queries, i, h, count, keys, values, kv, t0, t1, scaling, tile_scores, g: _tile_scores(
            queries, i, h, count, keys, kv, t0, t0, t1, scaling, tile_scores, g)

    def blocks(isa, queries, i, h, count, keys, values, kv, t0, t1, scaling, tile_scores, g):
        t = t0
        if count == 4 and queries.shape[2] % (byte_vector_size(isa) // 4) == 0:
            while t + 4 <= t1:
                _scores_4x4(isa, queries, i, h, keys, values, kv, t, scaling, tile_scores, g, t - t0)
                t += 4
        _tile_scores(queries, i, h, count, keys, kv, t0, t, t1, scaling, tile_scores, g)
    return blocks


def _context(isa, tile_scores, g, count, values, kv, t0, t1, chunk_context, i, h, c):
    """``chunk_context[i, h + x, c] += tile_scores[g + x, t - t0] * values[kv, t]`` for ``x < count``
    (4 or 1) and positions ``t0 .. t1``: 4 heads by register blocks where ``_vector_blocks``
    allows and ``d`` is a multiple of 4 vectors, otherwise by plain loops."""


@overload(_context, jit_options=_KERNEL)
def _context_for(isa, tile_scores, g, count, values, kv, t0, t1, chunk_context, i, h, c):
    if not _vector_blocks(isa, values, chunk_context):
        return lambda isa, tile_scores, g, count, values, kv, t0, t1, chunk_context, i, h, c: _tile_context(
            tile_scores, g, count, values, kv, t0, t1, chunk_context, i, h, c)

    def blocks(isa, tile_scores, g, count, values, kv, t0, t1, chunk_context, i, h, c):
        if count == 4 and values.shape[2] % byte_vector_size(isa) == 0:
            _context_4(isa, tile_scores, g, values, kv, t0, t1, chunk_context, i, h, c)
        else:
            _tile_context(tile_scores, g, count, values, kv, t0, t1, chunk_context, i, h, c)
    return blocks


@njit(**_KERNEL)
def _paired_from_both_ends(index, n):
    """The query row that work item row ``index`` serves: 0, n - 1, 1, n - 2, ...

    In a prefill, query ``i`` reads ``start + i + 1`` positions, so in order the last items would hold most
    of a prefill's work, and ``prange``, which hands each thread one contiguous run of items,
    would leave the first thread idle for most of it. Paired from both ends, any run of whole
    pairs holds the same number of positions. Which thread computes an item never changes
    its value.
    """
    return index // 2 if index % 2 == 0 else n - 1 - index // 2


@njit(**_KERNEL, inline="always")
def _row_chunks(rows, r):
    """How many chunks query row ``r``'s positions ``0 .. position`` fill."""
    return (rows[r, POSITION] + rows[r, CHUNK]) // rows[r, CHUNK]


@njit(**_STRICT)  # called from an item (one chunk) or a region of its own: both callers get the same bits
def _combine(rows, r, h, chunk_max, chunk_sum, chunk_context, out):
    """Query row ``r``'s head ``h`` into ``out``: its chunks' contexts weighted by ``e**(max - top)``,
    in chunk order, over the weighted sums."""
    chunks, d = _row_chunks(rows, r), chunk_context.shape[3]
    top = np.float32(-np.inf)
    for c in range(chunks):
        top = max(top, chunk_max[r, h, c])
    result = out[rows[r, ROW], h * d : (h + 1) * d]
    result[:] = 0.0
    total = np.float32(0.0)
    for c in range(chunks):
        weight = exp32(chunk_max[r, h, c] - top)
        total += weight * chunk_sum[r, h, c]
        for j in range(d):
            result[j] += weight * chunk_context[r, h, c, j]
    inv = np.float32(1.0) / total
    for j in range(d):
        result[j] *= inv


def causal_attention(isa, queries, rows, tables, layer, template, scaling, scores, chunk_max, chunk_sum,
                     chunk_context, out):
    """Softmax attention of each query row over its cache's positions ``0 .. position`` (causal).

    ``queries``: ``(n, heads, d)``; ``rows``: int64 ``(m, 4)``, per query row (:func:`query_rows`)
    its row of ``queries``/``out``, its cache, its position and its chunk length; ``tables``: int64
    ``(caches, layers, 3)`` of :func:`address_table` rows, read at ``layer``; ``template``: an
    array of the caches' type (:func:`cache_template`); query head ``h`` reads kv head
    ``h // (heads / kv_heads)``; the scratch as :func:`scratch_shapes` gives it; ``out``:
    ``(n, heads * d)``, written at the rows ``rows`` names.
    """
    m = rows.shape[0]
    heads, d = queries.shape[1], queries.shape[2]
    kv_heads = template.shape[0]
    group = heads // kv_heads
    # Items only for the chunks some row fills, not for the whole capacity: a cache that doubled holds
    # up to twice the positions in use, and ``prange``'s even runs of items would then give one
    # thread the filled chunks and the other the empty ones.
    chunks = 0
    for r in range(m):
        chunks = max(chunks, _row_chunks(rows, r))
    scaling = np.float32(scaling)  # a Python float would turn the dot products into float64 (3x slower)
    for item in prange(m * kv_heads * chunks):
        r = _paired_from_both_ends(item // (kv_heads * chunks), m)
        i, cache, chunk = rows[r, ROW], rows[r, CACHE], rows[r, CHUNK]
        keys = _cache_layer(tables, cache, layer, KEYS, template)
        values = _cache_layer(tables, cache, layer, VALUES, template)
        kv = item // chunks % kv_heads
        c = item % chunks
        first_head = kv * group
        lo = c * chunk
        hi = min(lo + chunk, rows[r, POSITION] + 1)
        tile_scores = scores[item]
        first_key = (kv * keys.shape[1] + lo) * d
        for e in range(0, min((hi - lo) * d, CACHE_PREFETCH_BYTES // keys.itemsize), 64 // keys.itemsize):
            prefetch(keys, first_key + e)
        for g in range(group):
            chunk_max[r, first_head + g, c] = -np.inf
            chunk_sum[r, first_head + g, c] = 0.0
            for j in range(d):
                chunk_context[r, first_head + g, c, j] = 0.0
        for t0 in range(lo, hi, TILE):
            t1 = min(t0 + TILE, hi)
            g = 0
            while g < group:  # four heads at a time read each cached row once; the rest one by one
                count = 4 if g + 4 <= group else 1
                _scores(isa, queries, i, first_head + g, count, keys, values, kv, t0, t1, scaling, tile_scores, g)
                g += count
            for g in range(group):
                h = first_head + g
                top = _row_max(tile_scores[g], t1 - t0, chunk_max[r, h, c])
                rescale = exp32(chunk_max[r, h, c] - top)
                chunk_max[r, h, c] = top
                chunk_sum[r, h, c] = _exponentials(isa, tile_scores[g], t1 - t0, top, chunk_sum[r, h, c], rescale)
                for j in range(d):
                    chunk_context[r, h, c, j] *= rescale
            g = 0
            while g < group:
                count = 4 if g + 4 <= group else 1
                _context(isa, tile_scores, g, count, values, kv, t0, t1, chunk_context, r, first_head + g, c)
                g += count
        if chunks == 1:
            for g in range(group):
                _combine(rows, r, first_head + g, chunk_max, chunk_sum, chunk_context, out)
    if chunks > 1:  # with one chunk each item has finished its heads already
        for item in prange(m * heads):
            _combine(rows, item // heads, item % heads, chunk_max, chunk_sum, chunk_context, out)


serial, parallel = serial_and_parallel((rope_into_caches, causal_attention), **_KERNEL)


_serial_attention, _parallel_attention = serial.causal_attention, parallel.causal_attention


def _entry_point(marker: IsaMarker, threaded: bool) -> CPUDispatcher:
    """``causal_attention`` (threaded or not) with the ISA marker fixed at compile time: as an
    argument it would cost a type dispatch (~3 us) per call, for each layer of a decode step.

    The entry closes over the marker and a bool only, not over a kernel: Numba keys its on-disk
    cache by the closure's pickled values, and a dispatcher pickles with a per-process id, so
    an entry closing over one was compiled again in every process.
    """

    def entry(queries, rows, tables, layer, template, scaling, scores, chunk_max, chunk_sum, chunk_context, out):
        if threaded:  # a compile-time constant: Numba drops the other branch
            _parallel_attention(marker, queries, rows, tables, layer, template, scaling, scores, chunk_max, chunk_sum,
                                chunk_context, out)
        else:
            _serial_attention(marker, queries, rows, tables, layer, template, scaling, scores, chunk_max, chunk_sum,
                              chunk_context, out)

    entry.__name__ = entry.__qualname__ = f"causal_attention_{marker.name}_{'parallel' if threaded else 'serial'}"
    return njit(**_KERNEL)(entry)


ENTRY_POINTS = {(name, threaded): _entry_point(marker, threaded) for name, marker in MARKERS.items()
                for threaded in (False, True)}
"""``causal_attention`` per kernel path and threading, taking its arguments after ``isa``."""


def for_rope(n: int) -> CPUDispatcher:
    """``rope_into_caches`` for ``n`` query rows: threaded where the row kernels are (``rows.threaded``)."""
    return (parallel if rows_threaded(n) else serial).rope_into_caches


def threaded_attention(n: int, context: int) -> bool:
    """Whether ``causal_attention`` for ``n`` query rows over up to ``context`` positions each runs on
    every thread, or on one, where that is too little work to wake the others."""
    return n * context >= PARALLEL_MIN_CONTEXT

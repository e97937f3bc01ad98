"""Causal attention over float32 and float16 KV caches, rope into the cache, and batched sequences.

References are plain numpy in float64; a float16 cache is compared with a reference that reads
the same keys and values rounded by numpy's own ``astype(np.float16)``.
"""

from __future__ import annotations

import re

import numba
import numpy as np
import pytest
from conftest import ALL_PATHS, AVX512_ASM, fresh_asm
from numba import types
from numba.extending import intrinsic

import bitnet as bn
from bitnet.kernels import attention as kernels
from bitnet.kernels import cpu_features, simd, vector_math
from bitnet.kernels import rows as row_kernels
from bitnet.nn import BitLinear, KVCache, RMSNorm, RotaryEmbedding
from bitnet.nn.attention import Attention


def reference_attention(q, k, v, start):
    """Causal softmax attention with query head h reading kv head h // group, in float64.

    ``q``: ``(n, heads, d)``; ``k``/``v``: ``(positions, kv_heads, d)``.
    """
    n, heads, d = q.shape
    group = heads // k.shape[1]
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    out = np.empty((n, heads, d))
    for h in range(heads):
        scores = q[:, h] @ k[:, h // group].T / np.sqrt(d)
        future = np.arange(k.shape[0])[None, :] > (start + np.arange(n))[:, None]
        scores[future] = -np.inf
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[:, h // group]
    return out.reshape(n, heads * d)


def run_kernel(q, k, v, start, dtype, threaded=None, path=bn.ops.KERNEL_PATH, room=5):
    """The library kernel (of kernel ``path``; threaded or not, by default as the model chooses) on ``q``
    and a cache of ``dtype`` holding ``k``/``v`` (``(positions, kv_heads, d)``) with ``room`` more positions."""
    n, heads, d = q.shape
    positions, kv_heads, _ = k.shape
    capacity = positions + room  # room past the filled positions, as a real cache has
    keys, values = (np.zeros((kv_heads, capacity, d), dtype) for _ in range(2))
    keys[:, :positions], values[:, :positions] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
    if dtype == np.float16:
        keys, values = keys.view(np.uint16), values.view(np.uint16)
    rows, tables, template = kernels.single_sequence(keys, values, start, n)
    shapes = kernels.scratch_shapes(n, kernels.chunk_length(n, capacity), heads, kv_heads, d, capacity)
    work = [np.full(shape, np.nan, np.float32) for shape in shapes.values()]  # NaN: every read must be written
    out = np.full((n, heads * d), np.nan, np.float32)
    threaded = kernels.threaded_attention(n, start + n) if threaded is None else threaded
    kernel = kernels.ENTRY_POINTS[path, threaded]
    kernel(q, rows, tables, 0, template, np.float32(d**-0.5), *work, out)
    return out


CASES = [  # heads, kv_heads, head_dim, queries, start: odd sizes, one query, contexts past a chunk and a tile
    (4, 4, 8, 5, 3), (4, 2, 16, 1, 0), (6, 1, 7, 3, 40), (20, 5, 128, 1, 700), (6, 3, 10, 9, 600),
    (2, 1, 33, 1, 255), (2, 2, 4, 1, 256), (3, 3, 6, 8, 31),
    # The AVX-512 register blocks (4 heads of a kv head, d a multiple of 16 or 64): positions that end
    # mid-block and mid-tile, 4 heads plus a 5th (one by one), d = 16 (scores in blocks, context not).
    (8, 2, 64, 1, 4093), (10, 2, 128, 2, 37), (5, 1, 16, 3, 29), (12, 3, 64, 9, 1), (4, 1, 128, 1, 0),
]


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("heads, kv_heads, d, n, start", CASES)
def test_attention_matches_numpy(rng, path, dtype, heads, kv_heads, d, n, start):
    q = rng.standard_normal((n, heads, d)).astype(np.float32)
    k, v = ((3 * rng.standard_normal((start + n, kv_heads, d))).astype(np.float32) for _ in range(2))
    k[1::7] = 0.0  # zeros mixed in
    stored_k, stored_v = (a.astype(dtype).astype(np.float32) for a in (k, v))
    expected = reference_attention(q, stored_k, stored_v, start)
    np.testing.assert_allclose(run_kernel(q, k, v, start, dtype, path=path), expected, rtol=2e-5, atol=2e-5)


@AVX512_ASM
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_avx512_attention_runs_in_register_blocks(dtype):
    """On AVX-512 the scores and the context of 4 heads go by 16 vector accumulators, widening
    f16 16 values per instruction, with the cache prefetched into L2 (``prefetcht1``) as they go."""
    heads, kv_heads, d, capacity = 8, 2, 64, 40
    cache = np.zeros((kv_heads, capacity, d), dtype)
    if dtype == np.float16:
        cache = cache.view(np.uint16)
    values = cache.copy()
    rows, tables, template = kernels.single_sequence(cache, values, 30, 1)
    shapes = kernels.scratch_shapes(1, kernels.chunk_length(1, capacity), heads, kv_heads, d, capacity)
    asm = fresh_asm(kernels.serial.causal_attention, simd.MARKERS["avx512vnni"], np.zeros((1, heads, d), np.float32),
                    rows, tables, 0, template, np.float32(0.125),
                    *(np.zeros(shape, np.float32) for shape in shapes.values()), np.empty((1, heads * d), np.float32))
    expected = (r"vfmadd\w+", r"vbroadcastss") + (("vcvtph2ps",) if dtype == np.float16 else ())
    for instruction in expected:
        assert re.search(rf"\b{instruction}\s[^\n]*%zmm", asm), instruction
    assert "prefetcht1" in asm and not re.search(r"extendhfsf2|h2f_ieee", asm)
    # a 4 x 4 block's scores leave as 4 rows of 4 (128-bit stores), not 16 scalar extracts and stores
    assert re.search(r"\bvextractf32x4\s+\$\d, %zmm\d+, -?\d*\(", asm)


@numba.njit
def _scaled_fours(isa, values, factor, out, index, stride):
    products = simd.mul_floats(simd.load_floats(isa, values, 0), simd.splat_floats(isa, factor))
    simd.store_fours(out, index, stride, products)


@pytest.mark.skipif(cpu_features.unsupported_reason("avx512vnni") is not None, reason="needs AVX-512 vectors")
def test_store_fours_writes_each_4_lanes_to_its_row(rng):
    values = rng.standard_normal(16).astype(np.float32)
    out = np.full((5, 7), np.nan, np.float32)
    _scaled_fours(simd.MARKERS["avx512vnni"], values, np.float32(0.3), out, 9, 7)  # from out[1, 2], rows of 7
    expected = np.full((5, 7), np.nan, np.float32)
    expected[1:5, 2:6] = (values * np.float32(0.3)).reshape(4, 4)  # float32 products, as numpy rounds them
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("n, start", [(1, 1100), (37, 5)])  # decode (chunked positions); prefill (items paired)
def test_serial_and_parallel_builds_and_thread_counts_give_the_same_bits(rng, n, start):
    heads, kv_heads, d = 8, 2, 64
    q = rng.standard_normal((n, heads, d)).astype(np.float32)
    k, v = (rng.standard_normal((start + n, kv_heads, d)).astype(np.float32) for _ in range(2))
    results = [run_kernel(q, k, v, start, np.float16, threaded=False)]
    for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
        numba.set_num_threads(threads)
        try:
            results.append(run_kernel(q, k, v, start, np.float16, threaded=True))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for result in results[1:]:
        assert np.array_equal(result, results[0])
    rounded = [a.astype(np.float16) for a in (k, v)]  # what the float16 cache holds
    np.testing.assert_allclose(results[0], reference_attention(q, *rounded, start), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n, start", [(1, 1100), (1, 255), (37, 5)])
def test_a_cache_with_room_to_spare_gives_the_same_bits(rng, n, start):
    # A doubled cache holds up to twice the positions in use: the work items cover only the chunks
    # the rows fill, and the empty ones are neither computed nor read (the scratch starts as NaN).
    heads, kv_heads, d = 8, 2, 64
    q = rng.standard_normal((n, heads, d)).astype(np.float32)
    k, v = (rng.standard_normal((start + n, kv_heads, d)).astype(np.float32) for _ in range(2))
    for threaded in (False, True):
        exact = run_kernel(q, k, v, start, np.float16, threaded, room=0)
        assert np.array_equal(run_kernel(q, k, v, start, np.float16, threaded, room=3 * (start + n)), exact)
        assert np.array_equal(run_kernel(q, k, v, start, np.float16, threaded, room=300), exact)


def test_inf_and_nan_reach_the_output_as_float32_attention_gives_them(rng):
    q = rng.standard_normal((1, 2, 8)).astype(np.float32)
    k, v = (rng.standard_normal((5, 1, 8)).astype(np.float32) for _ in range(2))
    v[2, 0, 3] = np.nan
    out = run_kernel(q, k, v, 4, np.float16)
    assert np.isnan(out[0, 3]) and np.isnan(out[0, 8 + 3]) and np.isfinite(np.delete(out[0], [3, 11])).all()


def rope_rows(qkv, heads, kv_heads, rope, start, queries, keys, values):
    """``kernels.for_rope`` for the rows of ``qkv`` from position ``start`` of one cache layer."""
    rows, tables, template = kernels.single_sequence(keys, values, start, qkv.shape[0])
    kernels.for_rope(len(rows))(qkv, heads, kv_heads, rope.cos, rope.sin, rows, tables, 0, template, queries)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rope_into_cache_rounds_keys_and_values_like_numpy(rng, dtype):
    heads, kv_heads, d, n, start = 4, 2, 16, 3, 5
    rope = RotaryEmbedding(d, 1e4)
    rope.reserve(start + n)
    qkv = (100 * rng.standard_normal((n, (heads + 2 * kv_heads) * d))).astype(np.float32)
    qkv[0, :5] = [7e4, -7e4, 1e-7, 65519.0, np.nan]  # past f16's range, a subnormal, a tie, NaN
    cache = KVCache(1, kv_heads, d, 16, dtype=dtype)
    queries = np.empty((n, heads, d), np.float32)
    rope_rows(qkv, heads, kv_heads, rope, start, queries, *cache.layer(0, kv_heads, d, n))
    reference = KVCache(1, kv_heads, d, 16, dtype="float32")
    ref_keys, ref_values = reference.layer(0, kv_heads, d, n)
    expected_queries = np.empty_like(queries)
    rope_rows(qkv, heads, kv_heads, rope, start, expected_queries, ref_keys, ref_values)
    assert np.array_equal(queries, expected_queries, equal_nan=True)
    with np.errstate(over="ignore"):
        for got, expected in ((cache.keys[0], ref_keys), (cache.values[0], ref_values)):
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got, expected.astype(dtype))
    assert not cache.keys[0][:, start + n :].any()  # nothing written past the new positions


def test_rope_on_every_thread_writes_what_it_writes_on_one(rng):
    heads, kv_heads, d, start = 4, 2, 16, 3
    n = row_kernels.PARALLEL_MIN_ROWS + 1
    rope = RotaryEmbedding(d, 1e4)
    rope.reserve(start + n)
    qkv = rng.standard_normal((n, (heads + 2 * kv_heads) * d)).astype(np.float32)
    results = []
    for kernel in (kernels.for_rope(n), kernels.serial.rope_into_caches):
        cache = KVCache(1, kv_heads, d, 16, dtype="float16")
        queries = np.empty((n, heads, d), np.float32)
        rows, tables, template = kernels.single_sequence(*cache.layer(0, kv_heads, d, n), start, n)
        kernel(qkv, heads, kv_heads, rope.cos, rope.sin, rows, tables, 0, template, queries)
        results.append((queries, cache.keys[0].copy(), cache.values[0].copy()))
    assert kernels.for_rope(n) is kernels.parallel.rope_into_caches
    for threaded, alone in zip(*results, strict=True):
        assert threaded.tobytes() == alone.tobytes()


def test_kv_cache_from_an_arena_grows_and_goes_back_to_it():
    arena = bn.Arena()
    cache = KVCache(2, 2, 8, capacity=4, arena=arena)
    assert arena.stats().live_arrays == 4
    cache.keys[1][:, :3] = 5.0
    cache.length = 3
    cache.reserve(7)
    assert cache.capacity == 8 and (cache.keys[1][:, :3] == 5.0).all() and arena.stats().live_arrays == 4
    cache.release()
    assert arena.stats().live_arrays == 0 and arena.used_bytes() == 0
    with pytest.raises(bn.InvalidValueError, match="released"):
        cache.reserve(9)
    for bad in ([1], -1, 2.5):
        with pytest.raises(bn.InvalidValueError, match="integer"):
            KVCache(1, 1, 8).reserve(bad)
    for bad in ([1], 2.5):
        with pytest.raises(bn.InvalidValueError, match="integers"):
            KVCache(1, 1, 8).layer(bad, 1, 8, 0)
        with pytest.raises(bn.InvalidValueError, match="integers"):
            KVCache(1, 1, 8).layer(0, 1, 8, bad)
    with pytest.raises(bn.InvalidValueError, match="dtype"):
        KVCache(1, 1, 8, dtype="bfloat16")
    with pytest.raises(bn.OutOfMemoryError, match="max_length"):  # 32 PiB of keys, refused up front by the OS
        KVCache(1, 1, 8).reserve(2**50)
    with pytest.raises(bn.OutOfMemoryError):
        KVCache(1, 1, 8, capacity=2**50)
    with pytest.raises(bn.DTypeError, match="arena"):
        KVCache(1, 1, 8, arena=np.zeros(3))


def _attention(rng, hidden=48, heads=4, kv_heads=2, d=12):
    projections = [BitLinear.from_float(rng.standard_normal(shape).astype(np.float32))
                   for shape in ((heads * d, hidden), (kv_heads * d, hidden), (kv_heads * d, hidden),
                                 (hidden, heads * d))]
    return Attention(*projections, RMSNorm(np.ones(heads * d)), heads, kv_heads, d, RotaryEmbedding(d, 1e4))


@pytest.mark.parametrize("dtypes", [("float32",) * 5, ("float16", "float32", "float16", "float32", "float32")])
def test_batched_attention_equals_each_sequence_alone(rng, dtypes):
    """All rows go through one kernel call per cache dtype, yet each gets the bits it gets alone: decode rows
    (chunked positions, past one chunk at 300), a prefill of 9 rows (one chunk), caches of either dtype."""
    attention = _attention(rng)
    lengths, history = [1, 5, 1, 9, 1], [3, 0, 70, 12, 300]
    x = rng.standard_normal((sum(lengths), 48)).astype(np.float32)
    caches, alone = [], []
    for n, past, dtype in zip(lengths, history, dtypes, strict=True):
        pair = []
        for _ in range(2):
            cache = KVCache(1, 2, 12, capacity=past + n, dtype=dtype)
            if past:
                attention(np.ones((past, 48), np.float32), cache, 0)
                cache.length = past
            pair.append(cache)
        caches.append(pair[0])
        alone.append(pair[1])
    ends = np.cumsum(lengths)
    sequences = [(cache, slice(int(end - n), int(end))) for cache, n, end in zip(caches, lengths, ends, strict=True)]
    batched = attention.batched(x, sequences, 0)
    for (cache, rows), single in zip(sequences, alone, strict=True):
        assert np.array_equal(batched[rows], attention(x[rows], single, 0))
        assert np.array_equal(cache.keys[0], single.keys[0]) and np.array_equal(cache.values[0], single.values[0])


def test_batched_attention_refuses_rows_that_do_not_cover_the_input(rng):
    attention = _attention(rng)
    x = rng.standard_normal((4, 48)).astype(np.float32)
    a, b = KVCache(1, 2, 12), KVCache(1, 2, 12)
    for sequences in ([(a, slice(0, 2)), (b, slice(3, 4))], [(a, slice(0, 2))], [(a, slice(0, 5))], [],
                      [(a, slice(0, 2)), (a, slice(2, 4))], [(a, 2)], [(None, slice(0, 4))]):
        with pytest.raises(bn.BitNetError):
            attention.batched(x, sequences, 0)


@intrinsic
def _f16_by_integers(typingctx, value):
    """``simd._f16_bits_narrow``: the F16C-less rounding (``NUMBA_CPU_NAME=generic`` caches), callable here."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return simd._f16_bits_narrow(builder, args[0])

    return types.uint16(value), codegen


@numba.njit
def _narrow(values, by_integers, out):
    for i in range(values.shape[0]):
        out[i] = _f16_by_integers(values[i]) if by_integers else simd.narrow_to_f16(values[i])


@pytest.mark.parametrize("by_integers", [True, False], ids=["integer-route", "cpu-route"])
def test_f16_narrowing_rounds_as_numpy(rng, by_integers):
    """Both routes of ``narrow_to_f16`` give numpy's ``astype(float16)``: ties to even, subnormals,
    overflow to Inf, NaN kept; over random bit patterns and every 97th float of f16's range."""
    dense = np.arange(0x30000000, 0x48000000, 97, dtype=np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x477FEFFF, 0x477FF000, 0x33000000,
                        0x33000001, 0x387FE000, 0x38800000, 0x387FF000], np.uint32)
    bits = np.concatenate([rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32), special, dense,
                           dense | 0x80000000])
    values = bits.view(np.float32)
    out = np.empty(values.shape, np.uint16)
    _narrow(values, by_integers, out)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    nan = np.isnan(values)
    assert np.isnan(out[nan].view(np.float16)).all()
    np.testing.assert_array_equal(out[~nan], expected[~nan])


@numba.njit(fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy")  # the kernels' flags
def _exp_and_running_max(x, out):
    top = np.float32(-np.inf)
    for i in range(x.shape[0]):
        out[i] = vector_math.exp32(x[i])
        top = vector_math.max32(top, x[i])
    return top


def test_exp32_is_within_one_ulp_of_exp_and_max32_is_the_max(rng):
    x = np.concatenate([rng.uniform(-90, 90, 500_000), rng.uniform(-1, 1, 100_000), [0.0, -0.0, 88.72, -87.33]])
    x = np.concatenate([x.astype(np.float32), np.array([np.inf, -np.inf, np.nan, 88.73, -87.34, -200], np.float32)])
    out = np.empty_like(x)
    top = _exp_and_running_max(x, out)
    assert top == np.inf  # NaN ignored (maxnum), +Inf the max
    with np.errstate(over="ignore"):
        exact = np.exp(x.astype(np.float64))
    normal = (exact >= np.finfo(np.float32).tiny) & (exact <= np.finfo(np.float32).max)
    ulps = np.abs(out[normal] - exact[normal]) / np.spacing(exact[normal].astype(np.float32))
    assert ulps.max() <= 1.0
    np.testing.assert_array_equal(out[-6:], np.array([np.inf, 0.0, np.nan, np.inf, 0.0, 0.0], np.float32))

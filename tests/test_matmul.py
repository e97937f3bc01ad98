"""bn.matmul / bn.matmul_int against plain numpy, on every kernel path (a path this CPU lacks is a skip)."""

import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest
from conftest import ALL_PATHS, AVX512_ASM, fresh_asm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitnet as bn
from bitnet import ops
from bitnet.kernels import cpu_features, simd, ternary_blocks, ternary_lanes, ternary_simd
from bitnet.kernels import matmul as kernels

PATHS = cpu_features.supported_paths()
FORMATS = list(bn.FORMATS)


def ternary(rng, m, k, granularity="tensor"):
    codes = rng.integers(-1, 2, (m, k)).astype(np.int8)
    if granularity == "tensor":
        scale = np.float32(rng.uniform(0.01, 2.0)).reshape(())
    else:
        scale = rng.uniform(0.01, 2.0, (m, 1)).astype(np.float32)
    return bn.TernaryTensor(codes, scale, granularity)


def int_reference(q, codes):
    return q.astype(np.int64) @ codes.astype(np.int64).T


def float_reference(x, t):
    q, a = bn.quantize_activations(x.reshape(-1, x.shape[-1]))
    acc = int_reference(q, t.codes).astype(np.float64)
    scale = t.scale.reshape(-1).astype(np.float64)
    return (acc / a.astype(np.float64) * scale).reshape(x.shape[:-1] + (t.shape[0],))


def random_q(rng, n, k):
    return rng.integers(-128, 128, (n, k)).astype(np.int8)


def test_the_selected_path_is_the_fastest_supported_one():
    assert ops.KERNEL_PATH in PATHS
    assert PATHS[-1] == "portable"
    if not os.environ.get(cpu_features.ENV_VAR):
        assert ops.KERNEL_PATH == PATHS[0]


def test_supported_paths_follow_the_features():
    assert cpu_features.supported_paths(set()) == ("portable",)
    assert cpu_features.supported_paths({"avx2"}) == ("avx2", "portable")
    assert cpu_features.supported_paths({"avx2", "avxvnni"}) == ("avxvnni", "avx2", "portable")
    full = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}
    assert cpu_features.supported_paths(full) == cpu_features.PATHS[1:]
    assert cpu_features.supported_paths(full | {"amx-tile", "amx-int8"}) == cpu_features.PATHS


def test_amx_is_offered_only_when_the_os_grants_the_tiles(monkeypatch):
    """Tile instructions without Linux's permission kill the process: a refusal must drop the path."""
    from bitnet.kernels import amx

    monkeypatch.setattr(amx, "request_permission", lambda: False)
    features = cpu_features._compile_target_features.__wrapped__()
    assert not {"amx-tile", "amx-int8"} & features
    assert "amx" not in cpu_features.supported_paths(set(features))


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_int_is_exact_for_every_format(rng, path, fmt):
    t = ternary(rng, 37, 517)
    p = bn.pack(t, fmt)
    q = random_q(rng, 19, 517)  # two GEMM tiles of 8 tokens and 3 through the GEMV loop
    got = bn.matmul_int(q, p, path=path)
    assert got.dtype == np.int32
    assert np.array_equal(got, int_reference(q, t.codes))
    assert np.array_equal(bn.matmul_int(q[2], p, path=path), int_reference(q[2:3], t.codes)[0])


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("n", [3, 7, 11])
def test_tokens_padded_to_a_tile_give_their_own_bits_and_write_only_their_rows(rng, path, n):
    """The lanes kernel computes 3 tokens left over as a tile of 4 (``padded_tokens``): each token's
    outputs are the bits it gets alone, and nothing is written past the last token's row."""
    t = ternary(rng, 37, 517, "channel")
    p = bn.pack(t, "i2")
    x = rng.standard_normal((n, 517)).astype(np.float32)
    x[-1] *= 1e4
    sentinel = np.full((n + 1, 37), 7.0, np.float32)
    out = bn.matmul(x, p, out=sentinel[:n], path=path)
    assert np.all(sentinel[n] == 7.0)
    alone = np.concatenate([bn.matmul(x[i:i + 1], p, path=path) for i in range(n)])
    assert np.array_equal(out.view(np.uint32), alone.view(np.uint32))


@pytest.mark.parametrize("path", ALL_PATHS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 70),
    k=st.integers(1, 700),
    n=st.integers(1, 11),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_int_random_odd_shapes(path, m, k, n, seed):
    rng = np.random.default_rng(seed)
    t = ternary(rng, m, k)
    q = random_q(rng, n, k)
    assert np.array_equal(bn.matmul_int(q, bn.pack(t, "i2"), path=path), int_reference(q, t.codes))


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("value", [-128, 127])
@pytest.mark.parametrize("n", [1, 5, 16])
def test_extreme_activations_do_not_overflow(rng, path, value, n):
    # 4099 * 128 is far past int16: a kernel keeping int16 partial sums would wrap.
    k = 4099
    codes = np.ones((5, k), np.int8)
    codes[1] = -1
    codes[2, ::2] = -1
    codes[3] = rng.integers(-1, 2, k)
    codes[4] = 0
    t = bn.TernaryTensor(codes, np.float32(1.0).reshape(()))
    q = np.full((n, k), value, np.int8)
    got = bn.matmul_int(q, bn.pack(t, "i2"), path=path)
    assert np.array_equal(got, int_reference(q, codes))
    assert abs(int(got[0, 0])) == 128 * k or abs(int(got[0, 0])) == 127 * k


@pytest.mark.parametrize("path", ALL_PATHS)
def test_k_past_the_accumulator_fold_is_exact(rng, path):
    # Past FOLD_BLOCKS blocks (the i2 GEMV) and FOLD_VECTORS weight vectors (the lanes GEMV) the
    # int32 lanes are flushed; check the seam.
    k = ternary_simd.FOLD_BLOCKS * ternary_blocks.BLOCK + 300
    codes = np.where(rng.random((3, k)) < 0.5, 1, -1).astype(np.int8)
    codes[0] = 1
    t = bn.TernaryTensor(codes, np.float32(1.0).reshape(()))
    q = np.full((2, k), -128, np.int8)
    q[1] = rng.integers(-128, 128, k)
    assert np.array_equal(bn.matmul_int(q, bn.pack(t, "i2"), path=path), int_reference(q, codes))


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 255, 1), (33, 257, 4), (64, 1000, 9)])
def test_matmul_matches_the_float_formula(rng, path, granularity, shape):
    m, k, n = shape
    t = ternary(rng, m, k, granularity)
    x = rng.standard_normal((n, k)).astype(np.float32)
    got = bn.matmul(x, bn.pack(t, "i2"), path=path)
    assert got.dtype == np.float32 and got.shape == (n, m)
    np.testing.assert_allclose(got, float_reference(x, t), rtol=2e-6, atol=0)


@pytest.mark.parametrize(
    "fmt,granularity",
    [(f, g) for f in FORMATS for g in ("tensor", "channel") if g in bn.FORMATS[f].granularities],
)
def test_matmul_every_format_and_the_repack_is_cached(rng, fmt, granularity):
    t = ternary(rng, 20, 300, granularity)
    p = bn.pack(t, fmt)
    x = rng.standard_normal((2, 300)).astype(np.float32)
    np.testing.assert_allclose(bn.matmul(x, p), float_reference(x, t), rtol=2e-6)
    if fmt != ops.WEIGHT_FORMAT:
        cached = p.cache[ops.WEIGHT_FORMAT]
        bn.matmul(x, p)
        assert p.cache[ops.WEIGHT_FORMAT] is cached


def test_batch_dims_and_one_dimensional_input(rng):
    t = ternary(rng, 10, 70)
    p = bn.pack(t, "i2")
    x = rng.standard_normal((2, 3, 70)).astype(np.float32)
    y = bn.matmul(x, p)
    assert y.shape == (2, 3, 10)
    np.testing.assert_allclose(y, float_reference(x, t), rtol=2e-6)
    assert bn.matmul(x[1, 2], p).shape == (10,)
    np.testing.assert_array_equal(bn.matmul(x[1, 2], p), y[1, 2])
    assert bn.matmul(np.empty((0, 70), np.float32), p).shape == (0, 10)


def test_out_is_written_and_returned(rng):
    t = ternary(rng, 12, 90)
    p = bn.pack(t, "i2")
    x = rng.standard_normal((3, 90)).astype(np.float32)
    out = np.full((3, 12), 7.0, np.float32)
    assert bn.matmul(x, p, out=out) is out
    np.testing.assert_array_equal(out, bn.matmul(x, p))


@pytest.mark.parametrize(
    "out, error",
    [
        (np.empty((3, 11), np.float32), bn.ShapeError),
        (np.empty((3, 12), np.float64), bn.DTypeError),
        (np.empty((12, 3), np.float32).T, bn.ShapeError),
    ],
)
def test_bad_out(rng, out, error):
    p = bn.pack(ternary(rng, 12, 90), "i2")
    with pytest.raises(error):
        bn.matmul(np.ones((3, 90), np.float32), p, out=out)


def test_bad_inputs_raise_the_library_errors(rng):
    p = bn.pack(ternary(rng, 8, 40), "i2")
    with pytest.raises(bn.DTypeError):
        bn.matmul(np.ones(40, np.int32), p)
    with pytest.raises(bn.DTypeError):
        bn.matmul_int(np.ones(40, np.float32), p)
    with pytest.raises(bn.ShapeError):
        bn.matmul(np.ones(41, np.float32), p)
    with pytest.raises(bn.ShapeError):
        bn.matmul_int(np.ones((2, 39), np.int8), p)
    with pytest.raises(bn.ShapeError):
        bn.matmul(np.float32(1.0), p)
    with pytest.raises(bn.DTypeError):
        bn.matmul(np.ones(40, np.float32), ternary(rng, 8, 40))


def test_group_scales_are_refused_with_a_format_error(rng):
    t = bn.quantize_weights(rng.standard_normal((4, 512)).astype(np.float32), "group", group_size=256)
    with pytest.raises(bn.FormatError, match="group"):
        bn.matmul(np.ones(512, np.float32), bn.pack(t, "tq2_0"))


def test_non_contiguous_inputs_and_read_only_weights(rng):
    t = ternary(rng, 9, 300, "channel")
    p = bn.pack(t, "i2")
    p.data.setflags(write=False)  # like weights memory-mapped from a file
    wide = rng.standard_normal((4, 600)).astype(np.float32)
    x = wide[:, ::2]
    np.testing.assert_allclose(bn.matmul(x, p), float_reference(np.ascontiguousarray(x), t), rtol=2e-6)
    fortran = np.asfortranarray(wide[:, :300])
    np.testing.assert_allclose(bn.matmul(fortran, p), float_reference(wide[:, :300], t), rtol=2e-6)
    q = random_q(rng, 4, 600)[:, ::2]
    assert np.array_equal(bn.matmul_int(q, p), int_reference(q, t.codes))


def test_float64_and_float16_activations_are_converted(rng):
    t = ternary(rng, 5, 64)
    p = bn.pack(t, "i2")
    x = rng.standard_normal((2, 64))
    np.testing.assert_allclose(bn.matmul(x, p), float_reference(x.astype(np.float32), t), rtol=2e-6)
    np.testing.assert_allclose(bn.matmul(x.astype(np.float16), p),
                               float_reference(x.astype(np.float16).astype(np.float32), t), rtol=2e-6)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_a_row_gives_a_nan_row(rng, path, bad):
    p = bn.pack(ternary(rng, 7, 100), "i2")
    x = rng.standard_normal((3, 100)).astype(np.float32)
    x[1, 17] = bad
    y = bn.matmul(x, p, path=path)
    assert np.isnan(y[1]).all()
    assert np.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("m, k, n", [(1, 1, 32), (37, 517, 33), (70, 700, 64), (33, 257, 100), (5, 64, 45),
                                     (16, 300, 16), (48, 1030, 80)])
def test_prefill_sized_batches_are_exact(rng, path, granularity, m, k, n):
    """From 32 tokens the amx path multiplies in tiles of 32 rows x 32 tokens, the avx512vnni
    path in groups of 16 rows x 8, 4 and 1 tokens: partial tiles of rows and tokens, k tails,
    and the extreme activations must all come out exact."""
    t = ternary(rng, m, k, granularity)
    p = bn.pack(t, "i2")
    q = random_q(rng, n, k)
    q[0] = -128
    q[-1] = 127
    assert np.array_equal(bn.matmul_int(q, p, path=path), int_reference(q, t.codes))
    x = rng.standard_normal((n, k)).astype(np.float32)
    np.testing.assert_allclose(bn.matmul(x, p, path=path), float_reference(x, t), rtol=2e-6)


def test_the_scratch_shapes_pick_each_tokens_loop():
    """The kernels read from their scratch's shapes which loop each token takes; the AMX choice
    (32+ tokens, k within exact int32 tile sums) is checked here on any CPU, amx or not."""

    def shapes(path, n, k_padded):
        return [shape for shape, _ in kernels.scratch_shapes(path, n, k_padded)]

    slots, rows = kernels.SCRATCH_SLOTS, kernels.GEMM_ROWS
    assert shapes("amx", 33, 512) == [(slots, 0, rows), (slots, 32, 512), (slots, 32, 32), (8, 16, 64)]
    for n, k_padded in [(31, 512), (40, kernels.AMX_MAX_K + 256)]:
        gemm_sums, codes, tile_sums, tiles = shapes("amx", n, k_padded)
        assert gemm_sums == (slots, n - n % 8, rows) and tiles[0] == codes[1] == tile_sums[1] == 0
    assert shapes("portable", 19, 256) == [(slots, 16, rows), (slots, 64), (19, 256)]
    assert shapes("avx2", 40, 512) == [(slots, 40, rows)] and shapes("avx2", 1, 256) == [(slots, 0, rows)]
    # avx512vnni: i2x16 weights, no scratch at all, whatever the batch.
    for n, k_padded in [(1, 256), (8, 512), (48, 512), (65, kernels.AMX_MAX_K + 256)]:
        assert shapes("avx512vnni", n, k_padded) == []


@pytest.mark.skipif("avx512vnni" not in PATHS, reason="decode_rows is AVX-512 code; this CPU has no AVX-512 VNNI")
def test_decode_rows_gives_each_rows_codes(rng):
    """The AMX tiles read rows decoded by ``decode_rows`` (no tile instructions in it, so it runs on
    any AVX-512 CPU): stored codes (``w + 1``) one byte each, zero-padded k included."""
    t = ternary(rng, 21, 700)
    w = bn.pack(t, "i2").data
    kp = w.shape[1] * 4
    codes = np.full((16, kp), 9, np.uint8)
    ternary_blocks.decode_rows(simd.MARKERS["amx"], w, 3, 13, codes)
    stored = np.ones((13, kp), np.int64)
    stored[:, :700] = t.codes[3:16].astype(np.int64) + 1
    assert np.array_equal(codes[:13], stored) and (codes[13:] == 9).all()


def test_vnni_activations_lay_out_tile_operands(rng):
    """The AMX tiles' activation layout (plain Numba, so it runs on any CPU): word ``[c, k4, t]``
    is activations ``64 c + 4 k4 .. + 3`` of token ``t``; columns past the tokens are left alone."""
    q = random_q(rng, 5, 256)
    q[0, :8] = [-128, 127, 0, -1, 1, -128, 127, 0]
    tiles = np.full((4, 16, 32), 7, np.int32)
    ternary_blocks.vnni_activations(q, tiles)
    words = q.view(np.int32)  # (5, 64): word j holds activations 4 j .. 4 j + 3
    assert np.array_equal(tiles[:, :, :5], words.reshape(5, 4, 16).transpose(1, 2, 0))
    assert (tiles[:, :, 5:] == 7).all()


def test_i2x16_puts_sixteen_rows_in_the_lanes_of_a_vector(rng):
    """Byte ``4 i + b`` of vector ``s`` of group ``g`` holds ``W[16 g + i, 16 s + 4 f + b] + 1`` in bits
    ``2f..2f+1``, written out here element by element; the rows past ``m`` hold zero weights."""
    t = ternary(rng, 19, 300)
    data = bn.pack(t, "i2x16").data
    assert data.shape == (2, 2048)  # 16 rows x 512 padded columns / 4 per byte
    padded = np.ones((32, 512), np.int64)
    padded[:19, :300] = t.codes.astype(np.int64) + 1
    expected = np.zeros((2, 2048), np.int64)
    for g in range(2):
        for s in range(32):
            for i in range(16):
                for b in range(4):
                    expected[g, 64 * s + 4 * i + b] = sum(
                        padded[16 * g + i, 16 * s + 4 * f + b] << (2 * f) for f in range(4))
    assert np.array_equal(data, expected)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_results_do_not_depend_on_the_thread_count(rng, path):
    t = ternary(rng, 301, 1100, "channel")
    p = bn.pack(t, "i2")
    x = rng.standard_normal((48, 1100)).astype(np.float32)  # 48 tokens: AMX tiles, 8-token tiles
    q = random_q(rng, 48, 1100)
    before = bn.get_num_threads()
    try:
        results = []
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            bn.set_num_threads(threads)
            assert bn.get_num_threads() == threads
            results.append((bn.matmul_int(q, p, path=path), bn.matmul(x, p, path=path), bn.matmul(x[0], p, path=path),
                            bn.matmul(x[:19], p, path=path)))
    finally:
        bn.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert a.tobytes() == b.tobytes()


def test_set_num_threads_validates():
    for bad in (0, numba.config.NUMBA_NUM_THREADS + 1, 1.5, True):
        with pytest.raises(bn.InvalidValueError):
            bn.set_num_threads(bad)


RELEASE_SCRIPT = """
import os, threading, numba, numpy as np, bitnet as bn
tasks = lambda: len(os.listdir("/proc/self/task"))
w = bn.pack(bn.quantize_weights(np.random.default_rng(0).standard_normal((300, 700)).astype(np.float32)), "i2")
x = np.random.default_rng(1).standard_normal((3, 700)).astype(np.float32)
first = bn.matmul(x, w)
print(numba.threading_layer(), tasks())
print(bn.release_worker_threads(), tasks())
results = []
worker = threading.Thread(target=lambda: results.append(bn.matmul(x, w)))
worker.start(); worker.join()
print(bn.matmul(x, w).tobytes() == first.tobytes() == results[0].tobytes())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_release_worker_threads_ends_this_threads_openmp_workers():
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], env=env, capture_output=True, text=True, check=True)
    layer, with_pool, released, after, same = done.stdout.split()
    assert same == "True"
    if layer != "omp":
        pytest.skip(f"Numba's threading layer here is {layer!r}: only OpenMP's workers are released")
    assert released == "True" and int(after) == int(with_pool) - 1  # the one worker beside this thread


def test_the_environment_variable_forces_a_path():
    code = "import bitnet.ops as o; print(o.KERNEL_PATH)"
    env = dict(os.environ, BITNET_KERNEL="portable")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "portable"
    env["BITNET_KERNEL"] = "sse9"
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "BITNET_KERNEL" in failed.stderr


def test_bench_table_runs_on_a_small_shape():
    from bitnet import bench

    rows = bench.run([(64, 300, 1), (10, 257, 9)], paths=["portable", ops.KERNEL_PATH], min_time=0.0)
    assert len(rows) == 4 and all(r.seconds > 0 and r.speedup > 0 for r in rows)
    table = bench.format_table(rows)
    assert "vs numpy f32" in table and "portable" in table
    w = bench.random_i2_weights(5, 300)
    assert set(np.unique(bn.unpack(w).codes)) <= {-1, 0, 1}


# ---- everything a kernel gets is checked up front ---------------------------------------------------------


def test_bad_paths_and_devices_are_library_errors(rng):
    p = bn.pack(ternary(rng, 8, 40), "i2")
    x = np.ones(40, np.float32)
    for bad in ("bogus", "AVX2", np.array(["portable"]), ["portable"]):
        with pytest.raises(bn.InvalidValueError, match="kernel path"):
            bn.matmul(x, p, path=bad)
        with pytest.raises(bn.InvalidValueError, match="kernel path"):
            bn.matmul_int(x.astype(np.int8), p, path=bad)
    for missing in set(cpu_features.PATHS) - set(PATHS):
        with pytest.raises(bn.InvalidValueError, match="CPU lacks"):
            bn.matmul(x, p, path=missing)
    for bad in ("tpu", np.zeros(3), None):
        with pytest.raises(bn.DeviceError):
            bn.matmul(x, p, device=bad)


@pytest.mark.parametrize(
    "bad, error",
    [(None, bn.DTypeError), ("x", bn.DTypeError), (np.zeros(40, np.complex64), bn.DTypeError),
     (np.zeros(40, bool), bn.DTypeError), (np.float32(1), bn.ShapeError)],
)
def test_odd_activations_are_library_errors(rng, bad, error):
    p = bn.pack(ternary(rng, 8, 40), "i2")
    with pytest.raises(error):
        bn.matmul(bad, p)
    with pytest.raises(bn.BitNetError):
        bn.matmul_int(bad, p)


def test_zero_tokens_give_an_empty_result_and_empty_weights_cannot_exist(rng):
    """numpy's rule for (0, k) @ (k, m): an empty (0, m) result. Weights with m = 0 or k = 0
    cannot be made (like bn.quantize_weights, PackedTernary refuses them), so matmul never sees them."""
    p = bn.pack(ternary(rng, 9, 70), "i2")
    for n_shape in [(0, 70), (2, 0, 70)]:
        assert bn.matmul(np.empty(n_shape, np.float32), p).shape == n_shape[:-1] + (9,)
        assert bn.matmul_int(np.empty(n_shape, np.int8), p).shape == n_shape[:-1] + (9,)
    assert bn.matmul(np.empty((0, 70), np.float32), p, out=np.empty((0, 9), np.float32)).shape == (0, 9)
    with pytest.raises(bn.ShapeError):
        bn.PackedTernary("i2", (0, 70), np.empty((0, 64), np.uint8), np.float32(1).reshape(()))
    with pytest.raises(bn.ShapeError):
        bn.PackedTernary("i2", (9, 0), np.empty((9, 0), np.uint8), np.float32(1).reshape(()))


def test_more_features_than_int32_sums_hold_are_refused():
    k = 2**24  # 2**24 x (-128) x (-1) = 2**31: one past int32
    p = bn.PackedTernary("i2", (1, k), np.full((1, k // 4), 0x55, np.uint8), np.float32(1).reshape(()))
    with pytest.raises(bn.ShapeError, match="input features"):
        bn.matmul_int(np.zeros(k, np.int8), p)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_cannot_change_after_a_matmul(rng, fmt):
    """The cached kernel layout is derived from the weights once: writes to the payload are refused
    and reshaping the payload view in place changes nothing, so later results stay right."""
    t = ternary(rng, 11, 300)
    given = bn.pack(t, fmt).data.copy()
    p = bn.PackedTernary(fmt, t.shape, given, t.scale)
    x = rng.standard_normal((3, 300)).astype(np.float32)
    first = bn.matmul(x, p)
    for write in (lambda: given.fill(0), lambda: p.data.fill(0), lambda: p.scale.fill(3)):
        with pytest.raises(ValueError, match="read-only"):
            write()
    view = p.data
    view.shape = (-1,)
    assert np.array_equal(bn.matmul(x, p), first)
    np.testing.assert_allclose(first, float_reference(x, t), rtol=2e-6)


@AVX512_ASM
def test_lanes_tiles_broadcast_the_activations_and_emit_in_vectors():
    """``ternary_lanes`` multiplies 16 rows at once: each ``vpdpbusd`` takes 4 activations broadcast
    from memory (``{1to16}``), and a group's outputs leave in zmm divides, not one ``vdivss`` each."""
    isa = simd.MARKERS["avx512vnni"]
    m, n, kp = 32, 13, 256
    ones = np.ones(n, np.float32)
    asm = fresh_asm(ternary_lanes.lanes_matmul, isa, np.zeros((m // 16, 4 * kp), np.uint8), np.zeros((n, kp), np.int8),
                    np.zeros(n, np.int32), ones, np.ones(m, np.float32), 1, np.zeros((n, m), np.int32),
                    np.zeros((n, m), np.float32), True)
    assert len(re.findall(r"vpdpbusd\s+[^\n]*\{1to16\}, %zmm", asm)) >= 8 + 4 + 4
    assert re.search(r"\bvdivps\s[^\n]*%zmm", asm)

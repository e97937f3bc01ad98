"""CUDA backend kernels, bit for bit against the CPU library and plain numpy.

These run wherever ``bitnet.cuda`` is usable: on a GPU, or under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported). The default CI run has neither;
there ``test_cuda_simulator.py`` re-runs this file in a subprocess under the simulator.
The simulator runs each CUDA thread as a Python thread, so shapes here stay small.
"""

import numpy as np
import pytest

import bitnet as bn
from bitnet.cuda import backend as cuda_backend

pytestmark = pytest.mark.skipif(
    cuda_backend.unavailable_reason() is not None,
    reason=f"CUDA backend unavailable: {cuda_backend.unavailable_reason()}",
)


def numpy_quantize(x):
    """The paper's per-token int8 quantization, written plainly in float32 numpy."""
    rows = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
    amax = np.abs(rows).max(axis=1, keepdims=True)
    a = np.float32(127) / np.maximum(amax, np.float32(1e-5))
    q = np.clip(np.rint(rows * a), -128, 127)
    bad = ~np.isfinite(rows).all(axis=1, keepdims=True)
    return np.where(bad, 0, q).astype(np.int8), np.where(bad, np.float32(np.nan), a).astype(np.float32)


def numpy_matmul(x, t: bn.TernaryTensor):
    """``float32(acc) / a * s`` in float32, the accumulator computed exactly in int64."""
    q, a = numpy_quantize(x)
    acc = q.astype(np.int64) @ t.codes.T.astype(np.int64)
    s = t.scale.reshape(1, -1) if t.granularity == "channel" else t.scale
    return acc.astype(np.float32) / a * s


def ternary(rng, m, k, granularity="tensor"):
    return bn.quantize_weights(rng.standard_normal((m, k)).astype(np.float32), granularity)


@pytest.mark.parametrize("shape", [(1, 1), (3, 300), (2, 257)])
def test_quantize_activations_bit_exact(rng, shape):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    q, a = cuda_backend.quantize_activations(x)
    q_cpu, a_cpu = bn.quantize_activations(x)
    q_np, a_np = numpy_quantize(x)
    assert q.dtype == np.int8 and a.dtype == np.float32
    assert np.array_equal(q, q_cpu) and np.array_equal(a, a_cpu)
    assert np.array_equal(q, q_np) and np.array_equal(a, a_np)


def test_quantize_activations_edge_rows():
    """Ties round to even; tiny rows use the 1e-5 floor; NaN/Inf rows give a = NaN and q = 0; 1-D keeps its shape."""
    x = np.array(
        [
            [127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -127.0],
            [1e-7, -1e-7, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, np.nan, 2.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 2.0, -np.inf, 0.0, 0.0, 0.0, 0.0],
        ],
        np.float32,
    )
    q, a = cuda_backend.quantize_activations(x)
    q_cpu, a_cpu = bn.quantize_activations(x)
    assert np.array_equal(q[0], [127, 0, 2, 2, 0, -2, -127])
    assert np.array_equal(q, q_cpu)
    assert np.array_equal(a, a_cpu, equal_nan=True)
    assert np.isnan(a[3:]).all() and not q[3:].any()
    q1, a1 = cuda_backend.quantize_activations(x[0])
    assert q1.shape == (7,) and a1.shape == (1,) and np.array_equal(q1, q[0])


@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (19, 300, 3)])
def test_matmul_int_exact(rng, m, k, n):
    t = ternary(rng, m, k)
    q = rng.integers(-128, 128, size=(n, k), dtype=np.int8)
    q[0, :] = -128  # the extreme code in every column
    got = cuda_backend.matmul_int(q, bn.pack(t, "i2"))
    assert got.dtype == np.int32
    assert np.array_equal(got, q.astype(np.int64) @ t.codes.T.astype(np.int64))
    assert np.array_equal(got, bn.matmul_int(q, bn.pack(t, "i2")))
    one = cuda_backend.matmul_int(q[1 % n], bn.pack(t, "i2"))
    assert one.shape == (m,) and np.array_equal(one, got[1 % n])


@pytest.mark.parametrize(
    ("m", "k", "n", "granularity"),
    [
        (1, 1, 1, "tensor"),  # one output, one input: all padding
        (45, 300, 1, "tensor"),  # decode path; 45 rows leave a partial block
        (3, 2100, 1, "channel"),  # per-row scales; rows long enough for the 4-loads-per-lane steps
        (7, 257, 2, "tensor"),  # prefill path, k just past a block
        (10, 130, 10, "channel"),  # two token tiles, the second partial
    ],
)
def test_matmul_bit_exact(rng, m, k, n, granularity):
    t = ternary(rng, m, k, granularity)
    p = bn.pack(t, "i2")
    x = rng.standard_normal((n, k)).astype(np.float32)
    got = cuda_backend.matmul(x, p)
    assert got.dtype == np.float32 and got.shape == (n, m)
    assert np.array_equal(got, numpy_matmul(x, t))
    assert np.array_equal(got, bn.matmul(x, p))


def test_matmul_one_token_1d_and_dispatch(rng):
    t = ternary(rng, 9, 200)
    p = bn.pack(t, "i2")
    x = rng.standard_normal(200).astype(np.float32)
    got = bn.matmul(x, p, device="cuda")
    assert got.shape == (9,)
    assert np.array_equal(got, bn.matmul(x, p))


def test_matmul_nan_row_gives_nan(rng):
    p = bn.pack(ternary(rng, 6, 64), "i2")
    x = rng.standard_normal((2, 64)).astype(np.float32)
    x[1, 3] = np.nan
    got = cuda_backend.matmul(x, p)
    assert np.isnan(got[1]).all() and np.isfinite(got[0]).all()
    assert np.array_equal(got, bn.matmul(x, p), equal_nan=True)


def test_other_formats_are_repacked_once(rng):
    t = ternary(rng, 8, 100)
    p = bn.pack(t, "tq2_0")
    x = rng.standard_normal((1, 100)).astype(np.float32)
    got = cuda_backend.matmul(x, p)
    resident = p.cache["cuda"]
    assert np.array_equal(got, numpy_matmul(x, t))
    cuda_backend.matmul(x, p)
    assert p.cache["cuda"] is resident
    assert resident.shape == (8, 100) and resident.kpad == 256


def test_device_arrays_stay_on_device(rng):
    """linear: device in, device out, weights uploaded once; out= is written in place."""
    from numba import cuda

    t = ternary(rng, 11, 70)
    w = bn.cuda.upload(bn.pack(t, "i2"))
    x = rng.standard_normal((1, 70)).astype(np.float32)
    y_dev = bn.cuda.linear(cuda.to_device(x), w)
    assert not isinstance(y_dev, np.ndarray)
    assert np.array_equal(y_dev.copy_to_host(), numpy_matmul(x, t))
    out = cuda.device_array(11, np.float32)
    returned = bn.cuda.linear(cuda.to_device(x[0]), w, out=out)
    assert returned is out and np.array_equal(out.copy_to_host(), numpy_matmul(x, t)[0])


def test_step_graph_replays_on_new_inputs(rng):
    """A captured two-matmul step replayed after writing a new token into its input buffer."""
    from numba import cuda

    t1, t2 = ternary(rng, 12, 90), ternary(rng, 5, 12, "channel")
    w1, w2 = bn.cuda.upload(bn.pack(t1, "i2")), bn.cuda.upload(bn.pack(t2, "tq2_0"))
    x = cuda.to_device(rng.standard_normal((1, 90)).astype(np.float32))
    hidden = cuda.device_array((1, 12), np.float32)
    out = cuda.device_array((1, 5), np.float32)

    def step(stream):
        bn.cuda.linear(x, w1, out=hidden, stream=stream)
        bn.cuda.linear(hidden, w2, out=out, stream=stream)

    graph = bn.cuda.StepGraph(step)
    new_token = rng.standard_normal((1, 90)).astype(np.float32)
    x.copy_to_device(new_token)
    graph.replay()
    graph.synchronize()
    expected_hidden = numpy_matmul(new_token, t1)
    assert np.array_equal(hidden.copy_to_host(), expected_hidden)
    assert np.array_equal(out.copy_to_host(), numpy_matmul(expected_hidden, t2))


def test_bitlinear_to_cuda_matches_cpu(rng):
    """``BitLinear.to("cuda")`` uploads the weights once; its forward stays bit-identical."""
    from bitnet.nn import BitLinear

    layer = BitLinear.from_float(rng.standard_normal((10, 70)).astype(np.float32))
    x = rng.standard_normal((1, 70)).astype(np.float32)
    on_cpu = layer(x).copy()
    assert layer.to("cuda") is layer and "cuda" in layer.weight.cache
    assert np.array_equal(layer(x), on_cpu)


def test_host_out_is_written(rng):
    t = ternary(rng, 4, 40)
    x = rng.standard_normal((2, 40)).astype(np.float32)
    out = np.full((2, 4), np.nan, np.float32)
    assert cuda_backend.matmul(x, bn.pack(t, "i2"), out=out) is out
    assert np.array_equal(out, numpy_matmul(x, t))


def test_bad_inputs_raise_library_errors(rng):
    p = bn.pack(ternary(rng, 4, 40), "i2")
    with pytest.raises(bn.ShapeError, match="40"):
        cuda_backend.matmul(np.ones((1, 41), np.float32), p)
    with pytest.raises(bn.DTypeError):
        cuda_backend.matmul(np.ones((1, 40), np.int32), p)
    with pytest.raises(bn.DTypeError):
        cuda_backend.matmul_int(np.ones((1, 40), np.int32), p)
    with pytest.raises(bn.ShapeError):
        cuda_backend.matmul(np.ones((1, 40), np.float32), p, out=np.empty((1, 5), np.float32))
    grouped = bn.pack(bn.quantize_weights(rng.standard_normal((4, 256)).astype(np.float32), "group", 256), "tq2_0")
    with pytest.raises(bn.FormatError):
        cuda_backend.matmul(np.ones((1, 256), np.float32), grouped)


@pytest.mark.slow
def test_long_rows_take_the_two_launch_path(rng):
    """k past the fused kernel's 48 KiB of shared memory: one token goes through quantize + GEMM."""
    k = cuda_backend.FUSED_MAX_SHARED_BYTES + 1
    t = ternary(rng, 2, k)
    x = rng.standard_normal((1, k)).astype(np.float32)
    assert np.array_equal(cuda_backend.matmul(x, bn.pack(t, "i2")), numpy_matmul(x, t))


@pytest.mark.slow
def test_more_than_32_rows_per_warp(rng):
    """The decode kernel writes results 32 rows at a time: cross that boundary (the simulator
    counts as one multiprocessor, so 530 rows give each warp 34)."""
    t = ternary(rng, 530, 16)
    x = rng.standard_normal((1, 16)).astype(np.float32)
    assert np.array_equal(cuda_backend.matmul(x, bn.pack(t, "i2")), numpy_matmul(x, t))


@pytest.mark.slow
def test_bigger_shapes(rng):
    for m, k, n in [(300, 2560, 1), (64, 1000, 17)]:
        t = ternary(rng, m, k, "channel")
        x = rng.standard_normal((n, k)).astype(np.float32)
        assert np.array_equal(cuda_backend.matmul(x, bn.pack(t, "i2")), numpy_matmul(x, t))

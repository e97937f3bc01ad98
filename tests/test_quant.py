"""Quantizers against the BitNet b1.58 formulas written plainly in numpy."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import bitnet as bn
from bitnet.kernels import quantize as kq
from bitnet.quant import round_half_thresholds

# ---- references: the formulas, nothing clever ------------------------------------------


def absmean_reference(w, granularity="tensor", group_size=None):
    w = np.asarray(w)
    if granularity == "tensor":
        mean = np.abs(w.astype(np.float64)).sum() / w.size
        scale = np.maximum(np.float32(mean), np.float32(1e-5))
        expanded = scale
    else:
        g = w.shape[1] if granularity == "channel" else group_size
        groups = np.abs(w.astype(np.float64)).reshape(w.shape[0], -1, g)
        scale = np.maximum((groups.sum(-1) / g).astype(np.float32), np.float32(1e-5))
        expanded = np.repeat(scale, g, axis=1)
    codes = np.clip(np.rint(w / expanded.astype(w.dtype)), -1, 1).astype(np.int8)
    return codes, scale


def activation_reference(x):
    x = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
    amax = np.abs(x).max(axis=1, keepdims=True)
    a = np.float32(127) / np.maximum(amax, np.float32(1e-5))
    q = np.clip(np.rint(x * a), -128, 127).astype(np.int8)
    return q, a


odd_shapes = st.tuples(st.integers(1, 9), st.integers(1, 300))


def float_matrices(shape, dtype=np.float32):
    values = st.one_of(
        st.just(0.0),
        st.floats(-1e4, 1e4, width=32),
        st.floats(-0.0009765625, 0.0009765625, width=32),
        st.floats(width=32, allow_nan=False, allow_infinity=False),
    )
    return hnp.arrays(dtype, shape, elements=values)


# ---- absmean --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data(), shape=odd_shapes)
def test_absmean_matches_formula_tensor_and_channel(data, shape):
    w = data.draw(float_matrices(shape))
    for granularity in ("tensor", "channel"):
        t = bn.quantize_weights(w, granularity)
        codes, scale = absmean_reference(w, granularity)
        assert isinstance(t, bn.TernaryTensor)
        assert t.codes.dtype == np.int8 and t.codes.shape == w.shape
        assert t.scale.dtype == np.float32 and t.scale.shape == np.shape(scale)
        assert np.array_equal(t.scale, scale)
        assert np.array_equal(t.codes, codes)


@pytest.mark.parametrize("shape,group", [((3, 64), 16), ((5, 300), 5), ((1, 7), 7), ((4, 512), 256)])
def test_absmean_groups_match_formula(rng, shape, group):
    w = rng.standard_normal(shape).astype(np.float32)
    t = bn.quantize_weights(w, "group", group_size=group)
    codes, scale = absmean_reference(w, "group", group)
    assert t.scale.shape == (shape[0], shape[1] // group)
    assert np.array_equal(t.scale, scale) and np.array_equal(t.codes, codes)
    assert np.array_equal(t.dequantize(), codes * np.repeat(scale, group, axis=1))


def test_absmean_float64_input_and_higher_rank(rng):
    w = rng.standard_normal((2, 3, 40))
    t = bn.quantize_weights(w)
    codes, scale = absmean_reference(w)
    assert np.array_equal(t.codes, codes) and t.scale == scale
    assert t.dequantize().dtype == np.float32


def test_all_zero_and_all_same():
    zero = bn.quantize_weights(np.zeros((3, 5), np.float32))
    assert zero.scale == np.float32(1e-5) and not zero.codes.any()
    same = bn.quantize_weights(np.full((2, 9), -0.25, np.float32))
    assert same.scale == np.float32(0.25) and (same.codes == -1).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ternarize_threshold_is_exactly_round_half_even(rng, dtype):
    """Values within a few ulps of s/2 and 3s/2 round exactly as rint(w / s) does."""
    scales = (rng.uniform(1e-5, 1e3, 400)).astype(np.float32)
    nudges = []
    for s in scales.astype(dtype):
        for centre in (s * dtype(0.5), s * dtype(1.5)):
            v = centre
            for _ in range(3):
                v = np.nextafter(v, dtype(0))
            for _ in range(7):
                nudges.append(v)
                v = np.nextafter(v, dtype(np.inf))
    w = np.array(nudges, dtype).reshape(len(scales), -1)
    w[::2] *= -1
    thresholds = round_half_thresholds(scales[:, None], dtype)
    codes = kq.ternarize(np.ascontiguousarray(w), np.ascontiguousarray(thresholds), w.shape[1])
    expected = np.clip(np.rint(w / scales[:, None].astype(dtype)), -1, 1)
    assert np.array_equal(codes, expected)


# ---- threshold and uniform --------------------------------------------------------------------


def test_threshold_matches_twn_formula(rng):
    w = rng.standard_normal((6, 50)).astype(np.float32)
    t = bn.quantize_weights(w, method="threshold", factor=0.7)
    absw = np.abs(w.astype(np.float64))
    keep = absw > 0.7 * absw.mean()
    assert np.array_equal(t.codes, (np.sign(w) * keep).astype(np.int8))
    assert t.scale == np.float32(absw[keep].mean())


def test_threshold_channel_and_search(rng):
    w = rng.standard_normal((4, 64)).astype(np.float32)
    t = bn.quantize_weights(w, "channel", method="threshold", factor=0.5)
    for r in range(4):
        absw = np.abs(w[r].astype(np.float64))
        keep = absw > 0.5 * absw.mean()
        assert np.array_equal(t.codes[r], (np.sign(w[r]) * keep).astype(np.int8))
        assert t.scale[r, 0] == np.float32(absw[keep].mean())
    best = bn.quantize_weights(w, method="threshold", factor=None)
    for factor in (0.3, 0.7, 1.0):
        assert bn.metrics.mse(w, best) <= bn.metrics.mse(w, bn.quantize_weights(w, method="threshold", factor=factor))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_matches_formula(rng, bits):
    w = rng.standard_normal((5, 33)).astype(np.float32)
    t = bn.quantize_weights(w, method="uniform", bits=bits)
    levels = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(w).max(), np.float32(1e-5)) / np.float32(levels)
    assert t.scale == scale
    assert np.array_equal(t.codes, np.clip(np.rint(w / scale), -levels, levels).astype(np.int8))
    assert isinstance(t, bn.TernaryTensor) == (bits == 2)
    assert t.bits == (1.58 if bits == 2 else bits)


# ---- activations --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data(), shape=odd_shapes)
def test_activations_match_formula(data, shape):
    x = data.draw(float_matrices(shape))
    q, a = bn.quantize_activations(x)
    q_ref, a_ref = activation_reference(x)
    assert q.dtype == np.int8 and a.dtype == np.float32 and a.shape == (shape[0], 1)
    assert np.array_equal(q, q_ref) and np.array_equal(a, a_ref)


def test_activations_1d_extremes_and_nonfinite():
    q, a = bn.quantize_activations(np.array([1.0, -1.0, 0.5, 0.0], np.float32))
    assert a.shape == (1,) and np.array_equal(q, [127, -127, 64, 0])
    q, a = bn.quantize_activations(np.zeros((1, 3), np.float32))
    assert a[0, 0] == np.float32(127) / np.float32(1e-5) and not q.any()
    x = np.ones((3, 4), np.float32)
    x[1, 2] = np.nan
    x[2, 0] = -np.inf
    q, a = bn.quantize_activations(x)
    assert np.isnan(a[1:]).all() and not q[1:].any() and a[0, 0] == 127


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w,kwargs,error",
    [
        (np.array([[1.0, np.nan]], np.float32), {}, bn.InvalidValueError),
        (np.array([[1.0, np.inf]], np.float32), {}, bn.InvalidValueError),
        (np.array([[1.0, -np.inf]], np.float32), {"granularity": "channel"}, bn.InvalidValueError),
        (np.array([[np.nan, 1.0]], np.float32), {"method": "threshold"}, bn.InvalidValueError),
        (np.array([[1e300, 1.0]]), {}, bn.InvalidValueError),
        (np.ones((2, 2), np.int32), {}, bn.DTypeError),
        (np.float32(1.0), {}, bn.ShapeError),
        (np.ones((0, 3), np.float32), {}, bn.ShapeError),
        (np.ones((2, 3, 4), np.float32), {"granularity": "channel"}, bn.ShapeError),
        (np.ones((2, 10), np.float32), {"granularity": "group", "group_size": 3}, bn.InvalidValueError),
        (np.ones((2, 10), np.float32), {"granularity": "group"}, bn.InvalidValueError),
        (np.ones((2, 10), np.float32), {"granularity": "row"}, bn.InvalidValueError),
        (np.ones((2, 10), np.float32), {"method": "magic"}, bn.InvalidValueError),
        (np.ones((2, 10), np.float32), {"method": "uniform", "bits": 3}, bn.InvalidValueError),
    ],
)
def test_bad_weights_raise_named_errors(w, kwargs, error):
    with pytest.raises(error) as info:
        bn.quantize_weights(w, **kwargs)
    assert isinstance(info.value, bn.BitNetError) and len(str(info.value)) > 20


def test_bad_activations_and_tensors_raise_named_errors():
    with pytest.raises(bn.DTypeError):
        bn.quantize_activations(np.ones(4, np.int8))
    with pytest.raises(bn.ShapeError):
        bn.quantize_activations(np.ones((2, 2, 2), np.float32))
    with pytest.raises(bn.InvalidValueError):
        bn.quantize_activations(np.ones(4, np.float32), bits=4)
    with pytest.raises(bn.InvalidValueError):
        bn.TernaryTensor(np.array([[2, 0]], np.int8), np.array(1.0, np.float32))
    with pytest.raises(bn.ShapeError):
        bn.TernaryTensor(np.array([[1, 0]], np.int8), np.ones((2, 1), np.float32), "channel")


# ---- metrics ------------------------------------------------------------------------------------


def test_metrics_match_plain_formulas(rng):
    w = rng.standard_normal((7, 45)).astype(np.float32)
    t = bn.quantize_weights(w)
    d = (t.codes * t.scale).astype(np.float64)
    w64 = w.astype(np.float64)
    assert bn.metrics.mse(w, t) == pytest.approx(np.mean((w64 - d) ** 2), rel=1e-12)
    assert bn.metrics.sqnr(w, t) == pytest.approx(10 * np.log10((w64**2).sum() / ((w64 - d) ** 2).sum()), rel=1e-12)
    assert bn.metrics.cosine(w, t) == pytest.approx((w64 * d).sum() / np.linalg.norm(w64) / np.linalg.norm(d))
    assert bn.metrics.sqnr(d, d) == float("inf")
    assert bn.metrics.mse(w, bn.pack(t, "i2")) == bn.metrics.mse(w, t)
    with pytest.raises(bn.ShapeError):
        bn.metrics.mse(w[:3], t)


# ---- odd Python values give library errors, never a builtin one -------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(granularity=np.array(["tensor", "channel"])), dict(granularity=["tensor"]), dict(method=np.zeros(2)),
     dict(granularity="group", group_size=2.5), dict(granularity="group", group_size="4"),
     dict(granularity="group", group_size=True), dict(granularity="group", group_size=-4),
     dict(method="threshold", factor="x"), dict(method="threshold", factor=np.nan),
     dict(method="threshold", factor=-0.5), dict(method="threshold", factor=[0.7]),
     dict(method="uniform", bits=np.array([2, 4])), dict(method="uniform", bits=3)],
)
def test_quantize_weights_odd_settings_are_invalid_values(kwargs):
    with pytest.raises(bn.InvalidValueError):
        bn.quantize_weights(np.ones((4, 8), np.float32), **kwargs)


@pytest.mark.parametrize("bits", [np.array([8, 8]), "8", 4, None])
def test_quantize_activations_odd_bits(bits):
    with pytest.raises(bn.InvalidValueError):
        bn.quantize_activations(np.ones(4, np.float32), bits)


@pytest.mark.parametrize(
    "args, error",
    [((None, np.float32(1)), bn.DTypeError), (([[1, 0]], np.float32(1)), bn.DTypeError),
     ((np.zeros((2, 4), np.int8), None), bn.DTypeError), ((np.zeros((2, 4), np.int8), 0.5), bn.DTypeError),
     ((np.zeros((2, 4), np.int8), np.float32(1), "row"), bn.InvalidValueError),
     ((np.zeros((2, 4), np.int8), np.ones((2, 2), np.float32), "group", 0), bn.InvalidValueError),
     ((np.zeros((2, 4), np.int8), np.ones((2, 2), np.float32), "group", None), bn.InvalidValueError),
     ((np.zeros(4, np.int8), np.ones((4, 1), np.float32), "channel"), bn.ShapeError),
     ((np.full((2, 4), 2, np.int8), np.float32(1)), bn.InvalidValueError)],
)
def test_ternary_tensor_made_directly_refuses_bad_fields(args, error):
    with pytest.raises(error):
        bn.TernaryTensor(*args)


def test_a_numpy_scalar_scale_is_kept_as_a_0d_array():
    t = bn.TernaryTensor(np.zeros((2, 4), np.int8), np.float32(0.5))
    assert isinstance(t.scale, np.ndarray) and t.scale.shape == ()

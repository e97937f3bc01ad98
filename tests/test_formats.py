"""Packing formats: exact round trips, hand-written layouts, and the ecosystem's own codecs."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import bitnet as bn
from bitnet.formats.i2_s import stored_scale

GGML_TYPES = {"tq2_0": GGMLQuantizationType.TQ2_0, "tq1_0": GGMLQuantizationType.TQ1_0}
CHANNEL_FORMATS = [name for name, f in bn.FORMATS.items() if "channel" in f.granularities]


def ternary(codes, scale=0.5, granularity="tensor", group_size=None):
    codes = np.asarray(codes, np.int8)
    if granularity == "tensor":
        scale = np.array(scale, np.float32)
    return bn.TernaryTensor(codes, np.asarray(scale, np.float32), granularity, group_size)


codes_2d = st.tuples(st.integers(1, 11), st.integers(1, 700)).flatmap(
    lambda shape: hnp.arrays(np.int8, shape, elements=st.sampled_from([-1, 0, 1]))
)


# ---- round trips ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(codes=codes_2d, fill=st.sampled_from([None, -1, 0, 1]))
def test_every_format_round_trips_exactly(codes, fill):
    if fill is not None:
        codes = np.full_like(codes, fill)
    t = ternary(codes, 0.37)
    for name in bn.FORMATS:
        p = bn.pack(t, name)
        assert p.format == name and p.shape == codes.shape and p.data.dtype == np.uint8
        back = bn.unpack(p)
        assert np.array_equal(back.codes, codes) and back.scale == t.scale


@pytest.mark.parametrize("name", CHANNEL_FORMATS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (1, 300), (9, 257), (4, 1280)])
def test_channel_scales_round_trip(rng, name, shape):
    w = rng.standard_normal(shape).astype(np.float32)
    t = bn.quantize_weights(w, "channel")
    back = bn.unpack(bn.pack(t, name))
    assert np.array_equal(back.codes, t.codes) and np.array_equal(back.scale, t.scale)
    assert back.granularity == "channel"


@pytest.mark.parametrize("name", ["tq2_0", "tq1_0"])
def test_group_256_scales_round_trip(rng, name):
    t = bn.quantize_weights(rng.standard_normal((3, 768)).astype(np.float32), "group", group_size=256)
    back = bn.unpack(bn.pack(t, name))
    assert np.array_equal(back.codes, t.codes) and np.array_equal(back.scale, t.scale)


# ---- the ecosystem's codecs ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tq2_0", "tq1_0"])
@pytest.mark.parametrize(
    "granularity,shape",
    [(g, s) for g in ("tensor", "channel") for s in ((1, 256), (3, 300), (5, 1024), (2, 1))]
    + [("group", (1, 256)), ("group", (5, 1024))],  # groups of 256 need in_features divisible by 256
)
def test_tq_bytes_equal_gguf_quantize(rng, name, granularity, shape):
    w = rng.standard_normal(shape).astype(np.float32) * 3
    w[0, : min(256, shape[1])] = 0  # an all-zero block: ggml writes d = 0
    t = bn.quantize_weights(w, granularity, group_size=256 if granularity == "group" else None)
    p = bn.pack(t, name)
    padded = np.pad(t.dequantize(), ((0, 0), (0, -shape[1] % 256)))
    assert np.array_equal(p.data, gguf_quantize(padded, GGML_TYPES[name]))
    fp16_scale = t.expanded_scale().astype(np.float16).astype(np.float32)
    ours = (t.codes * fp16_scale).astype(np.float32)
    theirs = gguf_dequantize(p.data, GGML_TYPES[name])[:, : shape[1]]
    assert np.array_equal(theirs, ours)


def test_hf_matches_formats_md_hand_example():
    # 5 output rows -> chunks of ceil(5/4) = 2 rows; bits 2i of packed[r, c] hold W[2i + r, c] + 1.
    codes = np.array([[1, -1], [0, 1], [-1, 0], [1, 1], [0, -1]], np.int8)
    p = bn.pack(ternary(codes), "hf")
    expected = np.array(
        [
            [(2 << 0) | (0 << 2) | (1 << 4), (0 << 0) | (1 << 2) | (0 << 4)],  # rows 0, 2, 4 (row 6 absent)
            [(1 << 0) | (2 << 2), (2 << 0) | (2 << 2)],  # rows 1, 3 (rows 5 and 7 absent)
        ],
        np.uint8,
    )
    assert np.array_equal(p.data, expected)


@pytest.mark.parametrize("m", [1, 4, 5, 7, 10, 12, 33])
def test_hf_equals_transformers_pack_weights(rng, m):
    import torch  # the test extra installs torch and transformers: a missing one must fail, not skip
    from transformers.integrations import bitnet as bitnet_integration

    codes = rng.integers(-1, 2, (m, 19)).astype(np.int8)
    theirs = bitnet_integration.pack_weights(torch.tensor(codes, dtype=torch.float32)).numpy()
    assert np.array_equal(bn.pack(ternary(codes), "hf").data, theirs)


def test_i2_hand_example():
    codes = np.zeros((1, 300), np.int8)
    codes[0, 0], codes[0, 64], codes[0, 128], codes[0, 192] = 1, -1, 1, 0
    codes[0, 299] = -1  # block 1, byte 43, field 0; fields 1-3 of that byte are padding
    data = bn.pack(ternary(codes), "i2").data
    assert data.shape == (1, 128)
    assert data[0, 0] == 2 | (0 << 2) | (2 << 4) | (1 << 6)
    assert data[0, 64 + 43] == 0 | (1 << 2) | (1 << 4) | (1 << 6)
    assert (np.delete(data[0], [0, 64 + 43]) == 0b01010101).all()


def test_i2_s_hand_example_and_tail():
    codes = np.zeros((2, 64), np.int8)  # 128 weights: exactly one block
    codes.reshape(-1)[[0, 32, 64, 96]] = [1, -1, 0, 1]
    p = bn.pack(ternary(codes, 0.75), "i2_s")
    assert p.data.shape == (32 + 32,)
    assert p.data[0] == (2 << 6) | (0 << 4) | (1 << 2) | (2 << 0)
    assert stored_scale(p.data) == np.float32(0.75) and not p.data[36:].any()
    assert p.nbytes == 64 and p.bits_per_weight == 4.0


def test_base3_hand_example():
    codes = np.array([[1, 0, -1, -1, 1, 0]], np.int8)  # trits 2,1,0,0,2 | 1,(pad 1,1,1,1)
    data = bn.pack(ternary(codes), "base3").data
    first = 2 * 81 + 1 * 27 + 0 + 0 + 2
    second = 1 * 81 + 1 * 27 + 1 * 9 + 1 * 3 + 1
    assert data.tolist() == [[-(-first * 256 // 243), -(-second * 256 // 243)]]


def test_sizes_and_bits_per_weight():
    t = ternary(np.zeros((8, 1024), np.int8))
    expected = {"i2": 8 * 256 + 4, "hf": 2 * 1024 + 4, "tq2_0": 8 * 4 * 66, "tq1_0": 8 * 4 * 54,
                "i2_s": 8 * 256 + 32, "base3": 8 * 205 + 4}
    for name, nbytes in expected.items():
        p = bn.pack(t, name)
        assert p.nbytes == nbytes and p.bits_per_weight == 8 * nbytes / (8 * 1024)


# ---- convert ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", list(bn.FORMATS))
def test_convert_equals_packing_directly(rng, source):
    t = bn.quantize_weights(rng.standard_normal((6, 333)).astype(np.float32))
    p = bn.pack(t, source)
    for target in bn.FORMATS:
        converted = bn.convert(p, target)
        assert converted.format == target
        assert np.array_equal(converted.data, bn.pack(t, target).data)
        assert converted.scale == t.scale
    assert bn.convert(p, source) is p


# ---- errors ---------------------------------------------------------------------------------------


def test_unknown_format_and_unholdable_scales():
    t = ternary(np.zeros((4, 8), np.int8))
    with pytest.raises(bn.FormatError, match="choose one of"):
        bn.pack(t, "q4_0")
    channel = ternary(np.zeros((4, 8), np.int8), np.ones((4, 1)), "channel")
    for name in ("i2_s", "hf"):
        with pytest.raises(bn.FormatError, match="cannot hold a channel scale"):
            bn.pack(channel, name)
    group = ternary(np.zeros((4, 8), np.int8), np.ones((4, 2)), "group", 4)
    with pytest.raises(bn.FormatError, match="group_size=4"):
        bn.pack(group, "tq2_0")


def test_bad_tensors_to_pack():
    with pytest.raises(bn.ShapeError):
        bn.pack(ternary(np.zeros(8, np.int8)), "i2")
    with pytest.raises(bn.DTypeError):
        bn.pack(bn.quantize_weights(np.ones((2, 4), np.float32), method="uniform", bits=4), "i2")
    with pytest.raises(bn.DTypeError):
        bn.pack(np.zeros((2, 4), np.int8), "i2")


@pytest.mark.parametrize("name", list(bn.FORMATS))
def test_truncated_or_wrong_size_payload_is_a_format_error(name):
    p = bn.pack(ternary(np.zeros((5, 300), np.int8)), name)
    for bad in (p.data.reshape(-1)[:-1], p.data[..., :-1], np.zeros(0, np.uint8)):
        with pytest.raises(bn.FormatError, match="corrupt"):
            bn.PackedTernary(name, p.shape, bad, p.scale)
    with pytest.raises(bn.DTypeError):
        bn.PackedTernary(name, p.shape, p.data.astype(np.int16), p.scale)


@pytest.mark.parametrize("name", ["i2", "hf", "tq2_0", "i2_s"])
def test_two_bit_value_three_is_a_format_error(name):
    p = bn.pack(ternary(np.zeros((4, 256), np.int8)), name)
    data = p.data.copy()
    data.reshape(-1)[0] = 0xFF
    with pytest.raises(bn.FormatError, match="value 3"):
        bn.unpack(bn.PackedTernary(name, p.shape, data, p.scale))


@pytest.mark.parametrize("fmt", ["tq2_0", "tq1_0"])
@pytest.mark.parametrize("scale", [1e-9, 1e5, 7e4])
def test_tq_formats_refuse_a_scale_fp16_cannot_hold(fmt, scale):
    """1e-9 would read back as all-zero weights and 1e5 as Inf: refused, naming the formats that hold it."""
    codes = np.array([[1, 0, -1] * 100], np.int8)
    t = bn.TernaryTensor(codes, np.float32(scale).reshape(()))
    with pytest.raises(bn.FormatError, match="cannot be stored as the fp16 block scale.*i2, hf, i2_s, base3"):
        bn.pack(t, fmt)
    for other in ("i2", "hf", "i2_s", "base3"):
        assert bn.unpack(bn.pack(t, other)).scale == np.float32(scale)
    zeros = bn.TernaryTensor(np.zeros_like(codes), np.float32(scale).reshape(()))
    assert not bn.unpack(bn.pack(zeros, fmt)).codes.any()  # an all-zero block stores d = 0: nothing is lost


# ---- a PackedTernary is checked once, when made, and cannot change afterwards ------------------------------


def _i2(rng, m=5, k=300):
    return bn.pack(bn.quantize_weights(rng.standard_normal((m, k)).astype(np.float32)), "i2")


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(shape=(5,)), bn.ShapeError),
        (dict(shape=(0, 300)), bn.ShapeError),
        (dict(shape=(5, 0)), bn.ShapeError),
        (dict(shape=(5.0, 300)), bn.ShapeError),
        (dict(shape=None), bn.ShapeError),
        (dict(data=None), bn.DTypeError),
        (dict(data=[[1, 2]]), bn.DTypeError),
        (dict(scale=None), bn.DTypeError),
        (dict(scale=0.5), bn.DTypeError),
        (dict(scale=np.float64(0.5)), bn.DTypeError),
        (dict(scale=np.ones(5, np.float32)), bn.ShapeError),
        (dict(scale=np.float32(np.nan)), bn.InvalidValueError),
        (dict(scale=np.float32(np.inf)), bn.InvalidValueError),
        (dict(granularity="row"), bn.InvalidValueError),
        (dict(granularity=np.array(["tensor"])), bn.InvalidValueError),
        (dict(granularity="tensor", group_size=4), bn.InvalidValueError),
        (dict(granularity="group", group_size=0, scale=np.ones((5, 1), np.float32)), bn.InvalidValueError),
        (dict(granularity="group", group_size=2.5, scale=np.ones((5, 120), np.float32)), bn.InvalidValueError),
        (dict(granularity="group", group_size=100, scale=np.ones((5, 3), np.float32)), bn.FormatError),
        (dict(format="i3"), bn.FormatError),
        (dict(format=None), bn.FormatError),
    ],
)
def test_packed_ternary_made_directly_refuses_bad_fields_with_library_errors(rng, change, error):
    p = _i2(rng)
    fields = dict(format="i2", shape=p.shape, data=p.data, scale=p.scale, granularity="tensor", group_size=None)
    with pytest.raises(error):
        bn.PackedTernary(**(fields | change))


def test_channel_scales_into_a_format_that_cannot_hold_them_are_refused(rng):
    t = bn.quantize_weights(rng.standard_normal((6, 40)).astype(np.float32), "channel")
    data = bn.pack(bn.quantize_weights(np.ones((6, 40), np.float32)), "hf").data
    with pytest.raises(bn.FormatError, match="cannot hold a channel scale"):
        bn.PackedTernary("hf", (6, 40), data, t.scale, "channel")


def test_empty_weights_are_refused_by_pack():
    with pytest.raises(bn.ShapeError):
        bn.pack(ternary(np.zeros((0, 8), np.int8)), "i2")


@pytest.mark.parametrize("bad", [None, np.zeros((2, 64), np.uint8), "i2", 3])
def test_unpack_and_convert_take_only_packed_ternary(bad):
    with pytest.raises(bn.DTypeError, match="PackedTernary"):
        bn.unpack(bad)
    with pytest.raises(bn.DTypeError, match="PackedTernary"):
        bn.convert(bad, "hf")


@pytest.mark.parametrize("name", ["i2", "hf", "tq2_0", "i2_s"])
@pytest.mark.parametrize("where", [0, -1])
def test_the_value_three_is_refused_when_the_packed_ternary_is_made(rng, name, where):
    """One rule for every path: no PackedTernary holds a 2-bit 3, so matmul never sees one (it
    would multiply as +2) and unpack never has to refuse one. The last code byte is checked too."""
    t = bn.quantize_weights(rng.standard_normal((5, 300)).astype(np.float32))
    p = bn.pack(t, name)
    for shift in range(0, 8, 2):
        data = p.data.copy()
        bn.FORMATS[name].code_fields(data)[where, where, where] = 0b11 << shift
        with pytest.raises(bn.FormatError, match="value 3"):
            bn.PackedTernary(name, p.shape, data, p.scale)


@pytest.mark.parametrize("name", ["tq1_0", "base3"])
def test_every_byte_of_the_base3_formats_decodes_to_ternary_codes(name):
    shape = (3, 256) if name == "tq1_0" else (3, 255)
    size = int(np.prod(bn.FORMATS[name].packed_shape(shape)))
    data = (np.arange(size) % 256).astype(np.uint8).reshape(bn.FORMATS[name].packed_shape(shape))
    if name == "tq1_0":  # keep the fp16 d bytes a finite scale
        data.reshape(3, -1, 54)[:, :, 52:] = np.array([1], np.float16).view(np.uint8)
    codes = bn.unpack(bn.PackedTernary(name, shape, data, np.float32(1).reshape(()))).codes
    assert set(np.unique(codes)) <= {-1, 0, 1}


@pytest.mark.parametrize("name", list(bn.FORMATS))
def test_the_payload_and_scale_are_read_only_and_the_object_immutable(rng, name):
    t = bn.quantize_weights(rng.standard_normal((5, 300)).astype(np.float32))
    given = bn.pack(t, name).data.copy()
    p = bn.PackedTernary(name, t.shape, given, t.scale)
    with pytest.raises(ValueError, match="read-only"):
        p.data[...] = 0
    with pytest.raises(ValueError, match="read-only"):
        given[...] = 0  # the caller's array is the payload (no copy): it is frozen too
    with pytest.raises(ValueError, match="read-only"):
        p.scale[...] = 2
    with pytest.raises(AttributeError, match="immutable"):
        p.shape = (1, 1)
    view = p.data
    view.shape = (-1,)  # reshaping a view in place leaves the object as it was
    assert p.data.shape == bn.FORMATS[name].packed_shape(t.shape)
    assert np.array_equal(bn.unpack(p).codes, t.codes)


def test_a_non_contiguous_payload_is_copied(rng):
    p = _i2(rng)
    wide = np.zeros((p.data.shape[0], 2 * p.data.shape[1]), np.uint8)
    wide[:, ::2] = p.data
    q = bn.PackedTernary("i2", p.shape, wide[:, ::2], p.scale)
    assert q.data.flags.c_contiguous and wide.flags.writeable
    assert np.array_equal(bn.unpack(q).codes, bn.unpack(p).codes)


def test_copies_and_pickles_are_checked_packed_ternaries(rng):
    import copy
    import pickle

    p = _i2(rng)
    for other in (copy.copy(p), copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert isinstance(other, bn.PackedTernary) and not other.data.flags.writeable
        assert np.array_equal(other.data, p.data) and other.scale == p.scale


def test_row_slices_split_a_stack_on_row_groups():
    """The payload rows of stacked tensors: one row each in i2, groups of 16 in i2x16, where a tensor
    that ends inside a group (but the last) has no rows of its own."""
    assert bn.FORMATS["i2"].row_slices([3, 5, 1]) == [slice(0, 3), slice(3, 8), slice(8, 9)]
    assert bn.FORMATS["i2x16"].row_slices([32, 16, 5]) == [slice(0, 2), slice(2, 3), slice(3, 4)]
    assert bn.FORMATS["i2x16"].row_slices([16, 8, 8]) is None


def test_a_payload_moves_only_into_a_read_only_copy_of_its_shape(rng):
    packed = bn.pack(bn.quantize_weights(rng.standard_normal((16, 256)).astype(np.float32)), "i2")
    writable = packed.data.copy()
    with pytest.raises(bn.FormatError, match="read-only copy"):
        packed._hold_in(writable)
    wrong = np.zeros((packed.data.shape[0] + 1, packed.data.shape[1]), np.uint8)
    wrong.flags.writeable = False
    with pytest.raises(bn.FormatError, match="read-only copy"):
        packed._hold_in(wrong)
    writable.flags.writeable = False
    packed._hold_in(writable)
    assert np.shares_memory(packed.data, writable) and not packed.data.flags.writeable

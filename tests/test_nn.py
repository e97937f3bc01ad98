"""bitnet.nn layers against the formulas written plainly in numpy (float64 where it helps)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALL_PATHS

import bitnet as bn
from bitnet.kernels import attention as attention_kernels
from bitnet.kernels import head as head_kernels
from bitnet.kernels.simd import MARKERS
from bitnet.nn import MLP, Attention, BitLinear, Embedding, KVCache, RMSNorm, RotaryEmbedding
from bitnet.nn.embedding import bf16_bits_to_float, float_to_bf16_bits


def reference_bitlinear(x, codes, scale):
    """HF BitLinear: per-row absmax int8 activations, integer matmul, then ``/ a * scale``."""
    a = 127 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    q = np.clip(np.rint(x * a), -128, 127)
    return (q @ codes.T.astype(np.float64)) / a * scale


@pytest.mark.parametrize("m, k", [(8, 64), (36, 72), (20, 300)])
def test_bitlinear_from_float_matches_reference(rng, m, k):
    w = rng.standard_normal((m, k)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    layer = BitLinear.from_float(w)
    t = bn.quantize_weights(w)
    np.testing.assert_allclose(layer(x), reference_bitlinear(x, t.codes, float(t.scale)), rtol=1e-5, atol=1e-5)
    assert layer.weight.format == bn.ops.WEIGHT_FORMAT and (layer.out_features, layer.in_features) == (m, k)


@pytest.mark.parametrize("divide", [False, True])
def test_bitlinear_from_packed_hf_bytes_and_bias(rng, divide):
    codes = rng.integers(-1, 2, (12, 64)).astype(np.int8)
    data = bn.pack(bn.TernaryTensor(codes, np.float32(1.0).reshape(())), "hf").data
    bias = rng.standard_normal(12).astype(np.float32)
    layer = BitLinear.from_packed(data, (12, 64), 4.0, "hf", divide=divide, bias=bias)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    scale = 0.25 if divide else 4.0
    np.testing.assert_allclose(layer(x), reference_bitlinear(x, codes, scale) + bias, rtol=1e-5, atol=1e-4)
    assert layer.checkpoint_scale == (np.float32(4.0), divide)


def test_bitlinear_input_norm_is_applied_first(rng):
    w = rng.standard_normal((8, 64)).astype(np.float32)
    norm = RMSNorm(rng.uniform(0.5, 1.5, 64), 1e-6)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(BitLinear.from_float(w, input_norm=norm)(x), BitLinear.from_float(w)(norm(x)))


@pytest.mark.parametrize("rows", [(16, 32, 16), (16, 8, 8), (5, 7, 9)])
def test_stacked_layers_give_the_same_outputs_and_share_bytes(rng, rows):
    """The layers keep views of the stacked bytes, unless a layer ends inside a row group of the
    kernels' format (``i2x16``: 16 rows a group), where the stack is repacked from the codes."""
    layers = [BitLinear.from_float(rng.standard_normal((m, 300)).astype(np.float32)) for m in rows]
    x = rng.standard_normal((3, 300)).astype(np.float32)
    separate = [layer(x).copy() for layer in layers]
    stacked = BitLinear.stacked(layers)
    np.testing.assert_array_equal(stacked(x), np.concatenate(separate, axis=1))
    group = bn.FORMATS[bn.ops.WEIGHT_FORMAT].row_group
    shared = all(m % group == 0 for m in rows[:-1])
    assert all(np.shares_memory(layer.weight.data, stacked.weight.data) for layer in layers) == shared
    for layer, before in zip(layers, separate, strict=True):
        np.testing.assert_array_equal(layer(x), before)


def test_rmsnorm_matches_formula(rng):
    x = rng.standard_normal((4, 96)).astype(np.float32) * 3
    w = rng.uniform(0.5, 1.5, 96).astype(np.float32)
    expected = w * x / np.sqrt((x.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(RMSNorm(w, 1e-5)(x), expected, rtol=2e-6, atol=1e-6)


def test_rope_rotates_half_pairs_by_position(rng):
    d, theta = 16, 10000.0
    rope = RotaryEmbedding(d, theta)
    x = rng.standard_normal((5, 3, d)).astype(np.float32)
    start = 300  # past the initial table: it grows
    angle = (start + np.arange(5))[:, None, None] * theta ** (-np.arange(0, d, 2) / d)
    first, second = x[..., : d // 2], x[..., d // 2 :]
    expected = np.concatenate([first * np.cos(angle) - second * np.sin(angle),
                               second * np.cos(angle) + first * np.sin(angle)], axis=-1)
    rope.apply(x, start)
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(bn.ShapeError):
        RotaryEmbedding(7, theta)


def test_kv_cache_grows_by_doubling_and_keeps_contents():
    cache = KVCache(layers=2, kv_heads=1, head_dim=4, capacity=4)
    cache.keys[1][:, :3] = 7.0
    cache.length = 3
    cache.reserve(9)
    assert cache.capacity == 16 and cache.keys[1].shape == (1, 16, 4)
    assert (cache.keys[1][:, :3] == 7.0).all()


@pytest.mark.parametrize("activation", ["relu2", "silu"])
@pytest.mark.parametrize("with_norm", [True, False])
def test_mlp_gated_activation_with_and_without_sub_norm(rng, activation, with_norm):
    h, i = 64, 96
    gate, up = (BitLinear.from_float(rng.standard_normal((i, h)).astype(np.float32)) for _ in range(2))
    down = BitLinear.from_float(rng.standard_normal((h, i)).astype(np.float32))
    norm = RMSNorm(rng.uniform(0.5, 1.5, i)) if with_norm else None
    x = (3 * rng.standard_normal((3, h))).astype(np.float32)
    g, u = gate(x).astype(np.float64), up(x).astype(np.float64)
    act = np.maximum(g, 0) ** 2 if activation == "relu2" else g / (1 + np.exp(-g))
    hidden = (act * u).astype(np.float32)
    expected = down(norm(hidden) if with_norm else hidden)
    np.testing.assert_allclose(MLP(gate, up, down, norm, activation)(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_without_sub_norm_projects_the_context(rng):
    d, heads = 8, 2
    hidden = heads * d
    projections = [BitLinear.from_float(rng.standard_normal((hidden, hidden)).astype(np.float32)) for _ in range(4)]
    attention = Attention(*projections, None, heads, heads, d, RotaryEmbedding(d, 1e4))
    x = rng.standard_normal((3, hidden)).astype(np.float32)
    with bn.nn.scratch.step():
        got = attention(x, KVCache(1, heads, d), 0).copy()
        expected = projections[3](_context(attention, x))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def _context(attention, x):
    """The attention kernels' context for ``x`` at position 0 of a new cache (what __call__ projects)."""
    n, heads, kv_heads, d = x.shape[0], attention.heads, attention.kv_heads, attention.head_dim
    cache = KVCache(1, kv_heads, d)
    keys, values = cache.layer(0, kv_heads, d, n)
    rows, tables, template = attention_kernels.single_sequence(keys, values, 0, n)
    queries = np.empty((n, heads, d), np.float32)
    attention_kernels.serial.rope_into_caches(attention._project(x), heads, kv_heads, attention.rope.cos,
                                              attention.rope.sin, rows, tables, 0, template, queries)
    shapes = attention_kernels.scratch_shapes(n, attention_kernels.chunk_length(n, cache.capacity), heads, kv_heads,
                                              d, cache.capacity)
    context = np.empty((n, heads * d), np.float32)
    attention_kernels.ENTRY_POINTS[bn.ops.KERNEL_PATH, False](
        queries, rows, tables, 0, template, attention.scaling, *(np.empty(s, np.float32) for s in shapes.values()),
        context)
    return context


@pytest.mark.parametrize("dtype, rtol", [("f32", 1e-6), ("f16", 2e-3), ("bf16", 1e-2), ("int8", 3e-2)])
def test_embedding_storage_rows_and_logits(rng, dtype, rtol):
    w = rng.standard_normal((300, 72)).astype(np.float32)
    table = Embedding.from_weights(w, dtype)
    assert table.dtype == dtype and table.vocab_size == 300
    ids = np.array([0, 299, 5, 5])
    np.testing.assert_allclose(table.rows(ids), w[ids], rtol=rtol, atol=rtol * 3)
    h = rng.standard_normal((2, 72)).astype(np.float32)
    exact = h @ table.float_weights().T  # the stored values: only summation order differs...
    tol = 2e-2 if dtype == "int8" else 1e-4  # ...and, for int8, h's rounding (tested exactly below)
    np.testing.assert_allclose(table.logits(h), exact, rtol=tol, atol=tol * np.abs(exact).max())


def int8_head_reference(table, row_scale, h):
    """llama.cpp's Q8_0 x Q8_0 written plainly: each block of 32 values of ``h`` to int8 by its
    absmax (``a = 127 / max|x|``), exact int64 dot products per block, ``/ a``, times the row scale."""
    out = np.zeros((h.shape[0], table.shape[0]))
    for t, row in enumerate(h):
        for start in range(0, h.shape[1], 32):
            x = row[start : start + 32]
            a = np.float32(127) / max(np.abs(x).max(), np.float32(1e-5))
            q = np.clip(np.rint(x * a), -128, 127).astype(np.int64)
            out[t] += (table[:, start : start + 32].astype(np.int64) @ q) / np.float64(a)
    return out * row_scale


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("vocab, width, tokens", [(1, 1, 3), (2, 64, 2), (3, 130, 1), (5, 37, 3), (7, 64, 1),
                                                  (9, 100, 5), (300, 72, 3), (33, 2560, 9)])
def test_int8_head_is_q8_0_dot_products(rng, path, vocab, width, tokens):
    table = rng.integers(-128, 128, (vocab, width)).astype(np.int8)
    table[0, : min(width, 70)] = -128  # the byte whose offset (t ^ 0x80) is 0
    table[vocab // 2] = 0
    row_scale = rng.uniform(0.001, 0.1, vocab).astype(np.float32)
    h = rng.standard_normal((tokens, width)).astype(np.float32)
    h[tokens // 2, : min(width, 40)] = 0  # an all-zero block
    h[-1, width // 2] = 3e30  # a huge value: its block's other values round to 0
    q = np.empty(h.shape, np.int8)
    block_scale = np.empty((tokens, -(-width // 32)), np.float32)
    out = np.empty((tokens, vocab), np.float32)
    head_kernels.logits_int8(MARKERS[path], table, row_scale, h, q, block_scale, out)
    expected = int8_head_reference(table, row_scale, h)
    for t in range(tokens):  # float32 sums of exact integer block dot products
        np.testing.assert_allclose(out[t], expected[t], rtol=1e-5, atol=1e-5 * np.abs(expected[t]).max())


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("vocab, width", [(7, 100), (13, 2560), (2, 1)])
def test_a_tokens_int8_logits_do_not_depend_on_the_tokens_beside_it(rng, path, vocab, width):
    """One token alone (rows one at a time) gets the bits it gets among 5 (groups of 4 rows), on every path."""
    table = rng.integers(-128, 128, (vocab, width)).astype(np.int8)
    row_scale = rng.uniform(0.001, 0.1, vocab).astype(np.float32)
    h = rng.standard_normal((5, width)).astype(np.float32)

    def logits(rows):
        q, out = np.empty(rows.shape, np.int8), np.empty((rows.shape[0], vocab), np.float32)
        head_kernels.logits_int8(MARKERS[path], table, row_scale, rows, q,
                                 np.empty((rows.shape[0], -(-width // 32)), np.float32), out)
        return out

    together = logits(h)
    for t in range(5):
        assert np.array_equal(logits(h[t : t + 1].copy())[0], together[t])


LANES_PATHS = [param for param in ALL_PATHS if param.values[0] in head_kernels.LANES_PATHS]


def lanes_logits(path, table, row_scale, h):
    """``logits_int8_lanes`` on ``table`` laid out by ``interleave_int8``, with fresh scratch of
    ``padded_tokens`` rows, filled with garbage (the padding rows must not matter)."""
    lanes = np.empty(head_kernels.lanes_shape(*table.shape), np.int8)
    head_kernels.interleave_int8(table, lanes)
    padded = lanes.shape[1] // head_kernels.INT8_GROUP
    blocks = padded // head_kernels.INT8_BLOCK
    tokens = head_kernels.padded_tokens(h.shape[0])
    whole = np.full((tokens + 1, table.shape[0]), -7.0, np.float32)
    out = whole[: h.shape[0]]  # the rows after it catch a padding token written out
    head_kernels.logits_int8_lanes(MARKERS[path], lanes, row_scale, h, np.full((tokens, padded), 77, np.int8),
                                   np.full((tokens, blocks), 1e30, np.float32),
                                   np.full((tokens, blocks), 12345, np.int32), out)
    assert (whole[h.shape[0] :] == -7.0).all()
    return out


@pytest.mark.parametrize("path", LANES_PATHS)
@pytest.mark.parametrize("vocab, width, tokens", [(1, 1, 3), (2, 64, 2), (3, 130, 1), (5, 37, 3), (17, 64, 4),
                                                  (9, 100, 5), (300, 72, 13), (33, 2560, 9), (48, 33, 8),
                                                  (20, 96, 6), (40, 64, 7)])
def test_int8_lanes_head_is_q8_0_dot_products(rng, path, vocab, width, tokens):
    """The lanes layout (16 rows a vector) gives llama.cpp's Q8_0 x Q8_0 too: vocabularies not a
    multiple of 16, widths not a multiple of 32, tiles of 8, 4 and 1 tokens, 2-3 and 5-7 tokens
    padded to a tile, extreme bytes."""
    table = rng.integers(-128, 128, (vocab, width)).astype(np.int8)
    table[0, : min(width, 70)] = -128
    table[vocab // 2] = 0
    row_scale = rng.uniform(0.001, 0.1, vocab).astype(np.float32)
    h = rng.standard_normal((tokens, width)).astype(np.float32)
    h[tokens // 2, : min(width, 40)] = 0
    h[-1, width // 2] = 3e30
    out = lanes_logits(path, table, row_scale, h)
    expected = int8_head_reference(table, row_scale, h)
    for t in range(tokens):  # float32 sums of exact integer block dot products, one per block
        np.testing.assert_allclose(out[t], expected[t], rtol=1e-5, atol=1e-5 * np.abs(expected[t]).max())
        assert np.array_equal(lanes_logits(path, table, row_scale, h[t : t + 1].copy())[0], out[t])


def test_int8_lanes_layout_and_its_inverse(rng):
    """Byte ``4 i + b`` of vector ``s`` of group ``g`` is ``table[16 g + i, 4 s + b]``, zero past the
    table; ``deinterleave_int8`` and ``rows_int8_lanes`` read it back."""
    table = rng.integers(-128, 128, (19, 37)).astype(np.int8)
    lanes = np.full(head_kernels.lanes_shape(19, 37), 99, np.int8)
    assert lanes.shape == (2, 64 * 16)
    head_kernels.interleave_int8(table, lanes)
    padded = np.zeros((32, 64), np.int8)
    padded[:19, :37] = table
    expected = padded.reshape(2, 16, 16, 4).transpose(0, 2, 1, 3).reshape(2, -1)  # (g, s, i, b)
    assert np.array_equal(lanes, expected)
    back = np.empty_like(table)
    head_kernels.deinterleave_int8(lanes, back)
    assert np.array_equal(back, table)
    row_scale = rng.uniform(0.1, 1, 19).astype(np.float32)
    ids = np.array([18, 0, 16, 5])
    rows = np.empty((4, 37), np.float32)
    head_kernels.rows_int8_lanes(lanes, row_scale, ids, rows)
    np.testing.assert_array_equal(rows, table[ids].astype(np.float32) * row_scale[ids, None])


def test_an_int8_embedding_keeps_its_table_in_the_kernels_layout(rng):
    """On AVX-512 VNNI an int8 table is stored interleaved (``table`` gives a row-major copy back),
    elsewhere as it is; rows, logits and ``nbytes`` agree either way."""
    table = rng.integers(-127, 128, (21, 40)).astype(np.int8)
    row_scale = rng.uniform(0.1, 1, 21).astype(np.float32)
    e = Embedding(table, "int8", row_scale)
    assert (e._lanes is not None) == (bn.ops.KERNEL_PATH in head_kernels.LANES_PATHS)
    assert np.array_equal(e.table, table) and (e.vocab_size, e.hidden_size) == (21, 40)
    assert e.nbytes == (table.nbytes if e._lanes is None else e._lanes.nbytes) + row_scale.nbytes
    np.testing.assert_array_equal(e.rows(np.array([20, 3])), table[[20, 3]] * row_scale[[20, 3], None])
    blocks = Embedding.int8_from_blocks([(table[:16], row_scale[:16]), (table[16:], row_scale[16:])], (21, 40))
    assert np.array_equal(blocks.table, table) and np.array_equal(blocks.row_scale, row_scale)
    h = rng.standard_normal((3, 40)).astype(np.float32)
    assert np.array_equal(blocks.logits(h), e.logits(h))
    for bad in ([(table[:5], row_scale[:5]), (table[5:], row_scale[5:])], [(table[:16], row_scale[:16])],
                [(table[:, :39], row_scale)], [(table, row_scale), (table[:1], row_scale[:1])]):
        with pytest.raises(bn.ShapeError):
            Embedding.int8_from_blocks(bad, (21, 40))
    for bad_shape in ((0, 40), (21,), "x", (21.5, 40)):
        with pytest.raises(bn.ShapeError):
            Embedding.int8_from_blocks([(table, row_scale)], bad_shape)
    for bad in ([(table.astype(np.float32), row_scale)], [table], [(table, row_scale, row_scale)], [None], None, 3):
        with pytest.raises(bn.DTypeError):
            Embedding.int8_from_blocks(bad, (21, 40))


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_head_kernels_nan_rows_and_thread_count(dtype):
    """Row pairs (r, r + half) with an odd vocabulary, 1 vs 2 threads, a NaN in one token only."""
    rng = np.random.default_rng(7)
    table = Embedding.from_weights(rng.standard_normal((1001, 200)).astype(np.float32), dtype)
    h = rng.standard_normal((2, 200)).astype(np.float32)
    np.testing.assert_allclose(table.logits(h), h @ table.float_weights().T, rtol=2e-2, atol=0.2)
    threads = bn.get_num_threads()
    try:
        bn.set_num_threads(1)
        one = table.logits(h)
        bn.set_num_threads(threads)
        np.testing.assert_array_equal(table.logits(h), one)
    finally:
        bn.set_num_threads(threads)
    h[0, 150] = np.nan
    logits = table.logits(h)
    assert np.isnan(logits[0]).all() and np.array_equal(logits[1], one[1])


def test_bf16_bits_round_to_nearest_even_like_ml_dtypes(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.concatenate([rng.standard_normal(1000).astype(np.float32),
                        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0e38], np.float32)])
    reference = x.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(float_to_bf16_bits(x), reference.view(np.uint16))
    np.testing.assert_array_equal(bf16_bits_to_float(float_to_bf16_bits(x)), reference.astype(np.float32))


def test_layers_built_side_by_side_stack_without_a_copy(rng):
    fmt = bn.ops.WEIGHT_FORMAT
    group = bn.FORMATS[fmt].row_group
    t = bn.quantize_weights(rng.standard_normal((768, 256)).astype(np.float32))
    data = bn.pack(t, fmt).data
    layers = [BitLinear(bn.PackedTernary(fmt, (rows, 256), data[start // group : (start + rows) // group], t.scale))
              for start, rows in [(0, 512), (512, 128), (640, 128)]]
    base = layers[0].weight.data.base
    stacked = BitLinear.stacked(layers)
    assert stacked.weight.data.base is base and stacked.weight.shape == (768, 256)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    np.testing.assert_array_equal(stacked(x)[:, 512:640], layers[1](x))


def test_random_layers_stack_without_a_copy_and_are_one_network_on_every_cpu(rng):
    from bitnet.models.random import random_linears

    layers = random_linears(np.random.default_rng(5), [512, 128, 128], 256)
    base = layers[0].weight.data.base
    stacked = BitLinear.stacked(layers)
    assert stacked.weight.data.base is base and stacked.weight.format == bn.ops.WEIGHT_FORMAT
    again = random_linears(np.random.default_rng(5), [512, 128, 128], 256)  # drawn as i2 bytes, then repacked
    i2 = np.random.default_rng(5)
    drawn = bn.unpack(bn.PackedTernary("i2", (768, 256), np.take(
        bn.models.random._VALID_I2_BYTES, i2.integers(0, 81, (768, 64), dtype=np.uint8)), np.float32(1 / 16)))
    assert np.array_equal(np.concatenate([bn.unpack(layer.weight).codes for layer in again]), drawn.codes)


def test_overflowing_activations_give_inf_or_nan_not_an_exception():
    """A finite but absurd norm gain (a corrupt file can hold one) overflows float32 activations;
    the float kernels must carry inf/NaN like numpy instead of raising ZeroDivisionError."""
    from bitnet.models import BitNetConfig, random_model

    config = BitNetConfig(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    model = random_model(config, seed=1, head_dtype="f32")
    for layer in model.layers:
        layer.mlp.sub_norm.weight[:] = np.float32(-2.8e25)
        layer.input_norm.weight[:] = np.float32(3e38)
    logits = model.forward(np.array([1, 2, 3]))
    assert logits.shape == (3, 40) and not np.isfinite(logits).all()


# Hardening: every public call checks what it hands a kernel (no bounds checks inside them).
# Each of these calls would have read or written outside an array before the checks: they
# must raise before any kernel runs, never crash the test process.

def test_embedding_rows_refuse_ids_outside_the_table():
    table = Embedding(np.ones((4, 8), np.uint16), "bf16")
    for ids in (np.array([2**40]), np.array([4]), np.array([-1])):
        with pytest.raises(bn.InvalidValueError, match=r"token ids must lie in \[0, 4\)"):
            table.rows(ids)
    with pytest.raises(bn.DTypeError):
        table.rows(np.array([1.0]))
    with pytest.raises(bn.ShapeError):
        table.rows(np.zeros((1, 1), np.int64))
    with pytest.raises(bn.ShapeError):
        table.rows(np.array([1, 2]), out=np.empty((1, 8), np.float32))
    assert table.rows([]).shape == (0, 8)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "int8"])
def test_embedding_checks_table_dtype_hidden_states_and_out(rng, dtype):
    table = Embedding.from_weights(rng.standard_normal((6, 8)).astype(np.float32), dtype)
    with pytest.raises(bn.ShapeError, match=r"\(tokens, 8\)"):
        table.logits(np.ones((2, 9), np.float32))
    with pytest.raises(bn.DTypeError, match="float32"):
        table.logits(np.ones((2, 8), np.float64))
    with pytest.raises(bn.ShapeError):
        table.logits(np.ones((2, 8), np.float32), out=np.empty((2, 5), np.float32))
    with pytest.raises(bn.DTypeError):
        table.logits(np.ones((2, 8), np.float32), out=np.empty((2, 6), np.float64))


def test_embedding_table_must_be_stored_as_its_dtype_says():
    for table, dtype in ((np.ones((4, 8), np.float32), "bf16"), (np.ones((4, 8), np.uint16), "f32"), ([[1.0]], "f32")):
        with pytest.raises(bn.DTypeError, match="Embedding.from_weights"):
            Embedding(table, dtype)
    with pytest.raises(bn.InvalidValueError, match="row_scale"):
        Embedding(np.ones((4, 8), np.int8), "int8")
    with pytest.raises(bn.ShapeError, match=r"\(4,\)"):
        Embedding(np.ones((4, 8), np.int8), "int8", np.ones(3, np.float32))
    with pytest.raises(bn.ShapeError):
        Embedding(np.ones((0, 8), np.float32), "f32")


def test_rms_norm_refuses_a_width_other_than_its_weight():
    norm = RMSNorm(np.ones(1, np.float32))
    # A width of 2**26 once read 256 MB past the one-element weight: the check comes before any allocation.
    with pytest.raises(bn.ShapeError, match=r"\(tokens, 1\)"):
        norm(np.broadcast_to(np.float32(1), (4, 1 << 26)))
    with pytest.raises(bn.ShapeError):
        RMSNorm(np.ones(4, np.float32))(np.ones((2, 3), np.float32))  # small widths read past silently
    with pytest.raises(bn.DTypeError):
        RMSNorm(np.ones(4, np.float32))(np.ones((2, 4), np.float64))
    with pytest.raises(bn.ShapeError):
        RMSNorm(np.ones(4, np.float32)).add_and_normalize(np.ones((2, 4), np.float32), np.ones((1, 4), np.float32))
    for weight in (np.ones(0, np.float32), np.ones((2, 2), np.float32)):
        with pytest.raises(bn.ShapeError):
            RMSNorm(weight)
    with pytest.raises(bn.DTypeError):
        RMSNorm("x")
    for eps in (0.0, -1e-5, float("nan"), "1e-5", True):
        with pytest.raises(bn.InvalidValueError, match="eps"):
            RMSNorm(np.ones(4, np.float32), eps)


def test_bitlinear_refuses_inputs_of_another_width_or_dtype(rng):
    layer = BitLinear.from_float(rng.standard_normal((8, 64)).astype(np.float32),
                                 input_norm=RMSNorm(np.ones(64, np.float32)))
    with pytest.raises(bn.ShapeError, match=r"\(tokens, 64\)"):
        layer(np.ones((2, 32), np.float32))
    with pytest.raises(bn.ShapeError):
        layer(np.ones(64, np.float32))
    with pytest.raises(bn.DTypeError):
        layer(np.ones((2, 64), np.int32))
    with pytest.raises(bn.ShapeError, match="input_norm"):
        BitLinear.from_float(np.ones((8, 64), np.float32), input_norm=RMSNorm(np.ones(32, np.float32)))
    with pytest.raises(bn.DTypeError):
        BitLinear(np.ones((8, 64), np.float32))
    with pytest.raises(bn.InvalidValueError, match="weight_scale"):
        BitLinear.from_packed(np.zeros((2, 64), np.uint8), (8, 64), [1.0, 2.0])


def _attention(rng, hidden=64, heads=4, kv_heads=2, d=16):
    projections = [BitLinear.from_float(rng.standard_normal(shape).astype(np.float32))
                   for shape in ((heads * d, hidden), (kv_heads * d, hidden), (kv_heads * d, hidden),
                                 (hidden, heads * d))]
    return Attention(*projections, None, heads, kv_heads, d, RotaryEmbedding(d, 1e4))


def test_attention_refuses_a_cache_of_another_layout(rng):
    attention = _attention(rng)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for cache in (KVCache(1, 1, 16, 8), KVCache(1, 2, 8, 8), KVCache(1, 4, 16, 8)):  # kv heads, head_dim
        with pytest.raises(bn.ShapeError, match="new_cache"):
            attention(x, cache, 0)
    with pytest.raises(bn.ShapeError, match="no layer 1"):
        attention(x, KVCache(1, 2, 16, 8), 1)
    small = KVCache(1, 2, 16, 2)  # 3 positions do not fit: it was not reserved
    with pytest.raises(bn.ShapeError, match="reserve"):
        attention(x, small, 0)
    small.length = -5
    with pytest.raises(bn.ShapeError):
        attention(x[:1], small, 0)
    with pytest.raises(bn.ShapeError):
        attention(x[:, :32], KVCache(1, 2, 16, 8), 0)
    with pytest.raises(bn.DTypeError):
        attention(x, None, 0)
    cache = KVCache(1, 2, 16, 8)
    assert attention(x, cache, 0).shape == (3, 64)


def test_decoder_layer_checks_its_arguments_before_anything_runs(rng):
    """The model runs its layers without per-layer checks (it checks ids and caches once a step);
    a DecoderLayer called on its own checks what its sublayers would have."""
    hidden, inner = 64, 96
    mlp = MLP(*(BitLinear.from_float(rng.standard_normal(shape).astype(np.float32))
                for shape in ((inner, hidden), (inner, hidden), (hidden, inner))), None)
    layer = bn.models.DecoderLayer(_attention(rng), mlp, RMSNorm(np.ones(hidden, np.float32)),
                                   RMSNorm(np.ones(hidden, np.float32)))
    x = rng.standard_normal((3, hidden)).astype(np.float32)
    cache = KVCache(1, 2, 16, 8)
    read_only = x.copy()
    read_only.flags.writeable = False
    bad_calls = [
        ((x[:, :32], [(cache, slice(0, 3))], 0), bn.ShapeError),  # width
        ((x.astype(np.float64), [(cache, slice(0, 3))], 0), bn.DTypeError),
        ((x, [(cache, slice(0, 2))], 0), bn.ShapeError),  # rows not covered
        ((x, [(KVCache(1, 2, 16, 2), slice(0, 3))], 0), bn.ShapeError),  # no room: not reserved
        ((x, [(KVCache(1, 4, 16, 8), slice(0, 3))], 0), bn.ShapeError),  # another layout
        ((x, [(cache, slice(0, 3))], 1), bn.ShapeError),  # no such layer
        ((read_only, [(cache, slice(0, 3))], 0), bn.ShapeError),
    ]
    before = x.copy()
    for args, error in bad_calls:
        with pytest.raises(error):
            layer(*args)
    assert np.array_equal(x, before) and not cache.keys[0].any()  # nothing ran
    expected = x.copy()  # the layer's formula, from the sublayers' public calls
    attended = layer.attention(layer.input_norm(expected), KVCache(1, 2, 16, 8), 0)
    expected += mlp(layer.post_attention_norm.add_and_normalize(expected, attended))
    layer(x, [(cache, slice(0, 3))], 0)
    assert np.array_equal(x, expected)


def test_attention_and_mlp_constructors_check_the_projection_shapes(rng):
    def linear(m, k):
        return BitLinear.from_float(rng.standard_normal((m, k)).astype(np.float32))

    rope = RotaryEmbedding(16, 1e4)
    with pytest.raises(bn.ShapeError, match="k_proj"):
        Attention(linear(64, 64), linear(16, 64), linear(32, 64), linear(64, 64), None, 4, 2, 16, rope)
    with pytest.raises(bn.ShapeError, match="rotary"):
        Attention(linear(64, 64), linear(32, 64), linear(32, 64), linear(64, 64), None, 4, 2, 16,
                  RotaryEmbedding(8, 1e4))
    for heads, kv_heads in ((0, 1), (4, 0), (4, 3), (4.0, 2)):
        with pytest.raises(bn.BitNetError):
            Attention(linear(64, 64), linear(32, 64), linear(32, 64), linear(64, 64), None, heads, kv_heads, 16, rope)
    with pytest.raises(bn.ShapeError, match="down_proj"):
        MLP(linear(96, 64), linear(96, 64), linear(64, 32), None)
    with pytest.raises(bn.ShapeError, match="up_proj"):
        MLP(linear(96, 64), linear(32, 64), linear(64, 96), None)
    mlp = MLP(linear(96, 64), linear(96, 64), linear(64, 96), None)
    with pytest.raises(bn.ShapeError):
        mlp(np.ones((2, 96), np.float32))
    for bad in ((0, 2, 16), (1, -1, 16), (1, 2, 16.0), (True, 2, 16)):
        with pytest.raises(bn.InvalidValueError):
            KVCache(*bad)
    for theta in (0.0, float("inf"), "1e4"):
        with pytest.raises(bn.InvalidValueError):
            RotaryEmbedding(16, theta)


def test_layers_check_what_was_assigned_to_them_since_construction(rng):
    # Layers are plain objects: each public call checks its own parts again, since the kernels check none.
    x = rng.standard_normal((3, 64)).astype(np.float32)
    layer = BitLinear.from_float(rng.standard_normal((8, 64)).astype(np.float32))
    layer.bias = np.ones(3, np.float32)
    with pytest.raises(bn.ShapeError, match="bias"):
        layer(x)
    layer.bias, layer.input_norm = None, RMSNorm(np.ones(32, np.float32))
    with pytest.raises(bn.ShapeError, match="input_norm"):
        layer(x)
    norm = RMSNorm(np.ones(64, np.float32))
    norm.weight = np.ones(64)
    with pytest.raises(bn.DTypeError, match="float32"):
        norm(x)
    with pytest.raises(bn.DTypeError, match="float32"):
        norm.add_and_normalize(x, x)
    shapes = ((96, 64), (96, 64), (64, 96))
    mlp = MLP(*(BitLinear.from_float(rng.standard_normal(s).astype(np.float32)) for s in shapes), None)
    mlp.down_proj = BitLinear.from_float(rng.standard_normal((64, 32)).astype(np.float32))
    with pytest.raises(bn.ShapeError, match="down_proj is 64x32"):
        mlp(x)
    model = bn.models.random_model(bn.BitNetConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=16), seed=5, head_dtype="f32")
    decoder = model.layers[0]
    decoder.attention.o_proj = BitLinear.from_float(rng.standard_normal((64, 48)).astype(np.float32))
    with pytest.raises(bn.ShapeError, match="o_proj is 64x48"):
        decoder(x.copy(), [(KVCache(1, 2, 16, 8), slice(0, 3))], 0)
    with pytest.raises(bn.ShapeError, match="o_proj is 64x48"):
        decoder.attention(decoder.input_norm(x), KVCache(1, 2, 16, 8), 0)


def test_eps_and_scaling_are_kept_as_float32_and_checked_when_assigned():
    # The kernels take float32: a Python float kept as it is would make Numba compile them for float64.
    norm = RMSNorm(np.ones(4, np.float32))
    norm.eps = 1e-6
    assert type(norm.eps) is np.float32 and norm.eps == np.float32(1e-6)
    model = bn.models.random_model(bn.BitNetConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=16), seed=5, head_dtype="f32")
    attention = model.layers[0].attention
    assert type(attention.scaling) is np.float32 and attention.scaling == np.float32(0.25)
    attention.scaling = 0.125
    assert type(attention.scaling) is np.float32
    for bad in (0.0, -1.0, float("nan"), "0.1", None):
        with pytest.raises(bn.InvalidValueError, match="eps"):
            norm.eps = bad
        with pytest.raises(bn.InvalidValueError, match="scaling"):
            attention.scaling = bad
    assert norm.eps == np.float32(1e-6) and attention.scaling == np.float32(0.125)

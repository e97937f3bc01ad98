"""The layers in one compiled call (``bitnet.models.compiled``) against the layers' own Python, bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import gc
import pickle
import weakref

import numpy as np
import pytest

import bitnet as bn
from bitnet import ops
from bitnet.memory import huge_pages
from bitnet.models import compiled


def python_layers(monkeypatch, model):
    """Make ``model`` run its layers' Python from now on (in this test)."""
    monkeypatch.setattr(compiled, "unsupported", lambda layers, hidden: "the test runs the layers' Python")
    model._compiled = None


def workload(model, kv_dtype):
    """Logits of a prefill with threaded row kernels, decode steps each side of threaded attention's
    threshold, and a batch of a decode row, a prompt chunk and a 2-token chunk; with what ran them."""
    model.kv_dtype = kv_dtype
    rng = np.random.default_rng(1)
    vocab = model.config.vocab_size
    caches = [model.new_cache(4) for _ in range(3)]  # grows on the way
    logits = [model.forward(rng.integers(0, vocab, 11), caches[0])]
    logits += [model.forward(rng.integers(0, vocab, 1), caches[0]) for _ in range(60)]  # 11 .. 71 positions
    model.forward(rng.integers(0, vocab, 5), caches[1])
    logits.append(model.forward_batch([rng.integers(0, vocab, n) for n in (1, 9, 2)], caches))
    return np.concatenate(logits), model._compiled.reason


@pytest.mark.parametrize("family", ["bitnet", "llama"])
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_compiled_layers_compute_the_bits_of_the_layers_python(monkeypatch, family, kv_dtype):
    config = bn.BitNetConfig(vocab_size=97, hidden_size=80, intermediate_size=112, num_hidden_layers=3,
                             num_attention_heads=10, num_key_value_heads=2, head_dim=8, bos_token_id=None,
                             eos_token_id=None)
    if family == "llama":
        config = dataclasses.replace(config, hidden_act="silu", sub_norms=False)
    model = bn.models.random_model(config, seed=3, head_dtype="f32")
    ours, reason = workload(model, kv_dtype)
    assert reason is None  # the compiled call ran
    python_layers(monkeypatch, model)
    expected, reason = workload(model, kv_dtype)
    assert reason is not None
    assert np.array_equal(ours, expected)


def test_the_compiled_call_follows_changes_to_the_layers(monkeypatch):
    config = bn.BitNetConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=None,
                             eos_token_id=None)
    model = bn.models.random_model(config, seed=5, head_dtype="f32")
    ids = np.random.default_rng(2).integers(0, 97, 12)
    before = model.forward(ids)
    norm = model.layers[1].post_attention_norm
    model.layers[1].post_attention_norm = bn.nn.RMSNorm(np.linspace(0.5, 1.5, 64), norm.eps, norm.tag)
    model.layers[0], model.layers[2] = model.layers[2], model.layers[0]
    changed = model.forward(ids)
    assert model._compiled.reason is None and not np.array_equal(changed, before)

    o_proj = model.layers[2].attention.o_proj
    o_proj.bias = np.ones(64, np.float32)
    with_bias = model.forward(ids)
    assert "bias" in model._compiled.reason  # the layers' Python ran
    o_proj.bias = None
    assert np.array_equal(model.forward(ids), changed) and model._compiled.reason is None

    python_layers(monkeypatch, model)
    assert np.array_equal(model.forward(ids), changed)
    o_proj.bias = np.ones(64, np.float32)
    assert np.array_equal(model.forward(ids), with_bias)


def test_layers_of_other_shapes_are_left_to_their_python():
    config = bn.BitNetConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=None,
                             eos_token_id=None)
    model = bn.models.random_model(config, seed=5, head_dtype="f32")
    wider = bn.models.random_model(dataclasses.replace(config, intermediate_size=128), seed=5, head_dtype="f32")
    assert compiled.unsupported(model.layers, 64) is None
    assert "rotary" in compiled.unsupported([model.layers[0], wider.layers[1]], 64)
    wider.layers[1].attention.rope = model.layers[0].attention.rope
    assert "shaped" in compiled.unsupported([model.layers[0], wider.layers[1]], 64)
    assert "shaped" in compiled.unsupported(model.layers, 80)
    model.layers[1].mlp.gate_up_proj = None
    assert "separate" in compiled.unsupported(model.layers, 64)


def test_a_copy_or_a_pickle_computes_with_its_own_arrays():
    config = bn.BitNetConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=None,
                             eos_token_id=None)
    model = bn.models.random_model(config, seed=5, head_dtype="f32")
    ids = np.arange(10)
    before = model.forward(ids)  # the tables are built
    assert np.array_equal(pickle.loads(pickle.dumps(model)).forward(ids), before)
    twin = copy.deepcopy(model)
    twin.layers[0].mlp.sub_norm.weight[:] *= 2  # in place: no assignment, so only the twin's own tables see it
    assert not np.array_equal(twin.forward(ids), before)
    assert np.array_equal(model.forward(ids), before)


@pytest.mark.parametrize("change, error, match", [
    (lambda m: setattr(m.layers[1].mlp, "down_proj", bn.nn.BitLinear.from_float(np.ones((64, 48), np.float32))),
     bn.ShapeError, r"model.layers\[1\]: down_proj is 64x48; 64x96 is needed"),
    (lambda m: setattr(m.layers[0].attention.sub_norm, "weight", np.ones(32, np.float32)),
     bn.ShapeError, r"model.layers\[0\]: the weight of the attention sub-norm must have 64 entries"),
    (lambda m: setattr(m.layers[1].input_norm, "weight", np.ones(64)), bn.DTypeError, "float32"),
    (lambda m: setattr(m.layers[0].attention, "qkv_proj", bn.nn.BitLinear.from_float(np.ones((96, 64), np.float32))),
     bn.ShapeError, "qkv_proj is 96x64; 128x64 is needed"),
    (lambda m: setattr(m.layers[1].attention.o_proj, "bias", np.ones(3, np.float32)), bn.ShapeError, "bias of o_proj"),
    (lambda m: m.layers.append(m.layers[0]), bn.ShapeError, "config has 2 layers"),
    (lambda m: setattr(m.layers[0], "mlp", None), bn.DTypeError, r"model.layers\[0\]"),
])
def test_layers_changed_so_that_they_cannot_run_are_refused_before_anything_runs(monkeypatch, change, error, match):
    # The kernels check nothing: a projection of another width once read and wrote past its buffers
    # on the layers' Python path, where the compiled call left such layers.
    config = bn.BitNetConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=None,
                             eos_token_id=None)
    model = bn.models.random_model(config, seed=5, head_dtype="f32")
    cache = model.new_cache(16)
    model.forward(np.arange(5), cache)
    change(model)
    for runs_python in (False, True):
        if runs_python:
            python_layers(monkeypatch, model)
        with pytest.raises(error, match=match):
            model.forward(np.arange(3), cache)
        with pytest.raises(error, match=match):
            model.forward_batch([np.arange(2)], [cache])
        assert cache.length == 5


def test_run_projections_makes_the_last_layers_projections_of_its_inputs():
    """bench-model's matmul time replays the projections as the compiled call makes them: layer after
    layer into the same buffers, so afterwards they hold the last layer's outputs of the inputs given."""
    from bitnet.nn import scratch

    config = bn.BitNetConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=None,
                             eos_token_id=None)
    model = bn.models.random_model(config, seed=6, head_dtype="f32")
    layers = model._current_layers()
    assert layers.reason is None
    rng = np.random.default_rng(4)
    last = model.layers[-1]
    projections = (last.attention.qkv_proj, last.attention.o_proj, last.mlp.gate_up_proj, last.mlp.down_proj)
    with scratch.step():
        normed, context, hidden = layers.projection_inputs(3)
        for values in (normed, context, hidden):
            values[:] = rng.standard_normal(values.shape, np.float32) * 4
        layers.run_projections(3)
        buffers = layers._buffers(3)
        for name, x, linear in zip(("qkv", "attended", "gate_up", "down"), (normed, context, normed, hidden),
                                   projections, strict=True):
            assert np.array_equal(buffers[name], bn.matmul(x, linear.weight)), name


@pytest.mark.skipif(not huge_pages.AVAILABLE,
                    reason="this OS has no huge-page advice (madvise MADV_HUGEPAGE): the weights stay where they are")
def test_the_compiled_call_moves_the_projections_onto_huge_pages_once():
    config = bn.BitNetConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=None,
                             eos_token_id=None)
    model = bn.models.random_model(config, seed=5, head_dtype="f32")
    weights = [linear.weight for linear in model.running_linears()]
    parts = [linear.weight for _, linear in model.named_linears()]  # q, k, v, gate, up view the stacked ones
    part_values = [p.data.copy() for p in parts]
    before = [ops._kernel_weights(w)[0].copy() for w in weights]
    assert not any(huge_pages.on_huge_pages(ops._kernel_weights(w)[0]) for w in weights)
    old_memory = [weakref.ref(ops._kernel_weights(w)[0].base) for w in weights]
    ids = np.random.default_rng(2).integers(0, 97, 12)
    model.forward(ids)
    gc.collect()
    assert all(ref() is None for ref in old_memory)  # nothing else held the old payloads: their memory went back
    moved = [ops._kernel_weights(w)[0] for w in weights]
    assert all(huge_pages.on_huge_pages(m) and not m.flags.writeable for m in moved)
    assert all(np.array_equal(m, b) for m, b in zip(moved, before, strict=True))
    for w, m in zip(weights, moved, strict=True):  # where the weight is in the kernels' layout, it holds the copy
        assert np.shares_memory(w.data, m) == (w.format == ops.WEIGHT_FORMAT)
    assert all(np.array_equal(p.data, v) for p, v in zip(parts, part_values, strict=True))
    addresses = [m.ctypes.data for m in moved]
    norm = model.layers[0].input_norm
    model.layers[0].input_norm = bn.nn.RMSNorm(np.linspace(0.5, 1.5, 64), norm.eps, norm.tag)
    model.forward(ids)  # the tables are built again, over the same memory
    assert [ops._kernel_weights(w)[0].ctypes.data for w in weights] == addresses


def test_where_the_os_has_no_huge_pages_the_weights_stay_where_they_are(monkeypatch):
    monkeypatch.setattr(huge_pages, "AVAILABLE", False)
    config = bn.BitNetConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=None,
                             eos_token_id=None)
    model = bn.models.random_model(config, seed=5, head_dtype="f32")
    weights = [linear.weight for linear in model.running_linears()]
    addresses = [ops._kernel_weights(w)[0].ctypes.data for w in weights]
    model.forward(np.arange(5))
    assert model._compiled.reason is None
    assert [ops._kernel_weights(w)[0].ctypes.data for w in weights] == addresses

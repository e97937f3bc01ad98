"""bitnet.torch: the QAT ``BitLinear``, ``replace_linear`` and the export to bitnet, transformers and GGUF.

Oracles: the BitNet b1.58 formulas written plainly in numpy (integer products in int64),
``bn.matmul`` on packed weights, transformers' own ``BitNetForCausalLM`` reading the exported
directory, and the float model a ``replace_linear``'d model came from.

Tolerances for whole models follow tests/test_model_hf.py: two forwards that sum their float
math (norms, rope, softmax) in different orders agree to float32 rounding, except that a value
sitting at a rounding boundary of the int8 activation quantization can land on the
neighbouring code, which moves the logits by far more than float32 rounding (here up to ~1e-2
of the logit range). So every prompt must be within ``FLIP_TOLERANCE`` of the logit range, at
least half of them within ``EXACT_TOLERANCE`` (a flip is rare; a bug shows on every prompt),
and greedy generations must match token for token. Prompts are short: the chance of a flip
grows with the number of activations quantized.
"""

from __future__ import annotations

import copy
import logging
import os

import numpy as np
import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # HF BitLinear is @torch.compile'd: run it eagerly
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import bitnet as bn  # noqa: E402
from bitnet.torch import (  # noqa: E402
    BitLinear,
    build_model,
    export_pretrained,
    from_pretrained,
    replace_linear,
    set_quantization,
    to_bitnet,
)
from bitnet.torch.linear import activation_scale  # noqa: E402

EXACT_TOLERANCE = 1e-5
FLIP_TOLERANCE = 2e-2
VOCAB = 331
PROMPTS = [[1], [5, 17, 42, 7, 99, 3], list(range(2, 40, 3)), [6, 11, 11, 11, 64, 8, 30, 2, 90, 45, 12],
           [7, 8], [50, 60, 70], [300, 301, 302, 303, 304, 305, 306, 307]]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one torch and one Numba thread (conftest.one_thread)."""


# ---------------------------------------------------------------------------------------------
# The layer: forward and gradients against the plain formulas


def reference(x: np.ndarray, w: np.ndarray, granularity: str):
    """The BitNet b1.58 forward written plainly: ``(y, q, a, codes, s)``, products summed in int64."""
    rows = x.reshape(-1, x.shape[-1])
    a = np.float32(127.0) / np.maximum(np.abs(rows).max(axis=1, keepdims=True), np.float32(1e-5))
    q = np.clip(np.rint(rows * a), -128, 127)
    magnitudes = np.abs(w).astype(np.float64)
    mean = magnitudes.mean() if granularity == "tensor" else magnitudes.mean(axis=1, keepdims=True)
    s = np.maximum(np.float32(mean) if granularity == "tensor" else mean.astype(np.float32), np.float32(1e-5))
    codes = np.clip(np.rint(w / s), -1, 1)
    acc = q.astype(np.int64) @ codes.astype(np.int64).T
    y = acc.astype(np.float32) / a * s.reshape(-1)
    assert y.dtype == np.float32
    return y.reshape(x.shape[:-1] + (w.shape[0],)), q, a, codes, s


def awkward_input(rng, shape):
    """Odd values: a zero row, zeros mixed in, a row of large values, a row of tiny ones."""
    x = rng.standard_normal(shape).astype(np.float32)
    rows = x.reshape(-1, shape[-1])
    if shape[-1] > 5:
        rows[:, ::5] = 0.0
    if len(rows) > 1:
        rows[1] = 0.0
    if len(rows) > 2:
        rows[2] *= np.float32(3e4)
    if len(rows) > 3:
        rows[3] *= np.float32(1e-7)  # max|x| below 1e-5: a is clamped
    return x


def layer_with(w: np.ndarray, granularity: str, bias: np.ndarray | None = None) -> BitLinear:
    layer = BitLinear(w.shape[1], w.shape[0], bias is not None, granularity=granularity)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(bias))
    return layer


SHAPES = [((7, 300), 37), ((1, 300), 37), ((5, 1), 3), ((2, 3, 513), 19), ((6, 256), 1)]


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("x_shape, out_features", SHAPES)
def test_forward_is_the_bitnet_formula_and_bn_matmul(rng, granularity, x_shape, out_features):
    k = x_shape[-1]
    x = awkward_input(rng, x_shape)
    w = (rng.standard_normal((out_features, k)) * rng.uniform(0.01, 2.0, (out_features, 1))).astype(np.float32)
    if k > 7:
        w[:, ::7] = 0.0
    if out_features > 2:
        w[1] *= np.float32(50.0)  # one large row: codes far outside the clip range
    layer = layer_with(w, granularity)
    with torch.no_grad():
        y = layer(torch.from_numpy(x)).numpy()
    expected, _, _, codes, s = reference(x, w, granularity)
    assert y.shape == expected.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=0)
    kernel = bn.matmul(x, bn.pack(bn.quantize_weights(w, granularity), "i2"))
    np.testing.assert_allclose(y, kernel, rtol=1e-6, atol=0)
    layer_codes, layer_scale = layer.ternary()
    assert layer_codes.dtype == torch.int8
    assert np.array_equal(layer_codes.numpy(), codes.astype(np.int8))
    np.testing.assert_allclose(layer_scale.numpy().reshape(-1), s.reshape(-1), rtol=1e-7, atol=0)


def test_activation_scale_is_exactly_the_formula(rng):
    """``a = 127 / max(max|x|, 1e-5)`` correctly rounded (torch's ``127.0 / t`` is ``t.reciprocal() * 127``)."""
    x = (rng.standard_normal((4000, 33)) * rng.uniform(1e-7, 1e3, (4000, 1))).astype(np.float32)
    a = activation_scale(torch.from_numpy(x)).numpy()
    expected = np.float32(127.0) / np.maximum(np.abs(x).max(axis=1, keepdims=True), np.float32(1e-5))
    assert a.dtype == np.float32 and np.array_equal(a, expected)
    _, kernel_scale = bn.quantize_activations(x)
    assert np.array_equal(a, kernel_scale)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_straight_through_gradients(rng, granularity):
    """x.grad is ``g @ (codes s)`` (dequantized weights), W.grad is ``g.T @ (q / a)``: identity STE."""
    x = awkward_input(rng, (6, 300))[[0, 2, 4, 5]]  # no zero row: a zero row has q / a = 0 anyway
    w = (rng.standard_normal((23, 300)) * 0.1).astype(np.float32)
    w[3] *= np.float32(20.0)
    layer = layer_with(w, granularity)
    xt = torch.from_numpy(x).requires_grad_()
    y = layer(xt)
    g = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(torch.from_numpy(g))
    _, q, a, codes, s = reference(x, w, granularity)
    g64 = g.astype(np.float64)
    expected_x = g64 @ (codes * s.astype(np.float64))
    expected_w = g64.T @ (q / a.astype(np.float64))
    np.testing.assert_allclose(xt.grad.numpy(), expected_x, rtol=1e-5, atol=1e-6 * np.abs(expected_x).max())
    np.testing.assert_allclose(layer.weight.grad.numpy(), expected_w, rtol=1e-5,
                               atol=1e-6 * np.abs(expected_w).max())


def test_strength_zero_is_f_linear_and_strength_mixes(rng):
    x = awkward_input(rng, (5, 260))
    w = (rng.standard_normal((11, 260)) * 0.2).astype(np.float32)
    bias = rng.standard_normal(11).astype(np.float32)
    model = nn.Sequential(layer_with(w, "tensor", bias), nn.ReLU(), layer_with(w[:, :11].copy(), "channel"))
    xt = torch.from_numpy(x)
    set_quantization(model, 0.0)
    assert all(m.strength == 0.0 for m in model if isinstance(m, BitLinear))
    with torch.no_grad():
        first = model[0](xt)
        assert torch.equal(first, F.linear(xt, model[0].weight, model[0].bias))
        assert torch.equal(model(xt), F.linear(torch.relu(first), model[2].weight))

    set_quantization(model, 0.25)
    assert all(m.strength == 0.25 for m in model if isinstance(m, BitLinear))
    with torch.no_grad():
        mixed = model[0](xt).numpy().astype(np.float64)
    # v + lambda (clip(round(v)) - v) for the activations v = x a and the weights v = W / s
    _, q, a, codes, s = reference(x, w, "tensor")
    v = x.astype(np.float64) * a
    q_mixed = v + 0.25 * (q - v)
    c_mixed = w / np.float64(s) + 0.25 * (codes - w / np.float64(s))
    expected = q_mixed @ c_mixed.T / a * np.float64(s) + bias
    np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert not np.allclose(mixed, reference(x, w, "tensor")[0] + bias, rtol=1e-3)  # neither end
    assert not np.allclose(mixed, x @ w.T + bias, rtol=1e-3)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), float("inf")])
def test_invalid_strength_raises(strength):
    model = nn.Sequential(BitLinear(8, 4))
    with pytest.raises(bn.InvalidValueError, match="strength"):
        set_quantization(model, strength)
    assert model[0].strength == 1.0


def test_unknown_granularity_raises():
    with pytest.raises(bn.BitNetError, match="granularity"):
        BitLinear(8, 4, granularity="group")


# ---------------------------------------------------------------------------------------------
# replace_linear on another architecture (Llama)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights well away from init, so quantization visibly changes the logits
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape) * 0.05)
    return model


def test_replace_linear_on_llama_keeps_weights_and_float_forward():
    model = tiny_llama()
    original = copy.deepcopy(model)
    before = dict(model.named_parameters())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert replace_linear(model) is model

    assert type(model.lm_head) is nn.Linear
    bit_linears = {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}
    assert len(bit_linears) == n_linear - 1 == 2 * len(PROJECTIONS)
    assert all(type(m) is not nn.Linear for name, m in model.named_modules() if name != "lm_head")
    assert all(m.granularity == "tensor" and m.strength == 1.0 for m in bit_linears.values())
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, parameter in after.items():
        assert parameter is before[name], name
        assert parameter.data_ptr() == before[name].data_ptr(), name
        assert torch.equal(parameter, dict(original.named_parameters())[name]), name

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 35, 89, 79]])
    with torch.no_grad():
        expected = original(ids).logits
        set_quantization(model, 0.0)
        assert torch.equal(model(ids).logits, expected)
        set_quantization(model, 1.0)
        quantized = model(ids).logits
    assert quantized.shape == expected.shape and torch.isfinite(quantized).all()
    assert (quantized - expected).abs().max() > 1e-2 * expected.abs().max()

    # Training the replaced model moves the original's parameters: they are the same tensors.
    loss = model(ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight is before["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q_proj.weight, original.model.layers[0].self_attn.q_proj.weight)


def test_replace_linear_exclude_and_granularity():
    model = replace_linear(tiny_llama(1), exclude=("lm_head", "down_proj"), granularity="channel")
    for name, module in model.named_modules():
        if name == "lm_head" or name.endswith("down_proj"):
            assert type(module) is nn.Linear, name
        elif name.endswith(PROJECTIONS):
            assert isinstance(module, BitLinear) and module.granularity == "channel", name


# ---------------------------------------------------------------------------------------------
# The BitNet model: export to the HF layout, transformers, GGUF, and back


def model_config(tied: bool) -> bn.BitNetConfig:
    return bn.BitNetConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, rope_theta=10000.0,
        tie_word_embeddings=tied,
    )


def trained_model(tied: bool, granularity: str = "tensor", seed: int = 0):
    """A model after three AdamW steps on random tokens (weights away from their init), in eval mode."""
    model = build_model(model_config(tied), granularity, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (4, 25), generator=generator)
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape and ours.dtype == np.float32 and ref.dtype == np.float32
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def assert_logits_match(logits_of, ref_of, prompts=PROMPTS):
    errors = [relative_error(logits_of(ids), ref_of(ids)) for ids in prompts]
    assert max(errors) <= FLIP_TOLERANCE, errors
    assert sum(e <= EXACT_TOLERANCE for e in errors) >= len(errors) / 2, errors


def torch_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def checkpoint_ternary(path):
    """Projection name -> TernaryTensor of the checkpoint, read with bn.load_pretrained's reader."""
    weights = bn.io.read_weights(path, bn.io.read_config(path))
    return {name[: -len(".weight")]: weights[name] for name in weights if name.rpartition(".")[0].endswith(PROJECTIONS)}


@pytest.fixture(scope="module", params=["tied", "untied"])
def exported(request, tmp_path_factory):
    tied = request.param == "tied"
    model = trained_model(tied, seed=3 if tied else 4)
    path = export_pretrained(model, tmp_path_factory.mktemp(request.param) / "model")
    return model, path, tied


def hf_model(path):
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_export_matches_torch_bitnet_and_transformers(exported):
    model, path, tied = exported
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    ours = bn.load_pretrained(path)
    assert ours.tied == tied and ours.config.vocab_size == VOCAB
    reference = hf_model(path)
    assert type(reference).__name__ == "BitNetForCausalLM"
    assert reference.config.tie_word_embeddings == tied

    assert_logits_match(ours.forward, lambda ids: torch_logits(model, ids))
    assert_logits_match(lambda ids: torch_logits(reference, ids), lambda ids: torch_logits(model, ids))
    assert_logits_match(ours.forward, lambda ids: torch_logits(reference, ids))
    for ids in PROMPTS[1:4]:
        expected = torch_greedy(model, ids, 8)
        assert ours.generate(ids, 8) == expected
        assert torch_greedy(reference, ids, 8) == expected

    # The checkpoint holds exactly the codes the torch layers quantize to, and their scales.
    stored = checkpoint_ternary(path)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}
    assert stored.keys() == layers.keys() and len(layers) == 2 * len(PROJECTIONS)
    for name, layer in layers.items():
        codes, scale = layer.ternary()
        assert np.array_equal(stored[name].codes, codes.numpy()), name
        np.testing.assert_allclose(stored[name].scale, scale.numpy(), rtol=2**-22, atol=0, err_msg=name)


def test_export_then_gguf_round_trip(exported, tmp_path):
    _, path, tied = exported
    ours = bn.load_pretrained(path)
    ours_linears = dict(ours.named_linears())
    for fmt in ("tq2_0", "tq1_0", "i2_s"):
        file = tmp_path / f"model-{fmt}.gguf"
        bn.save_gguf(ours, file, fmt)
        loaded = bn.load_gguf(file)
        assert loaded.tied == tied
        linears = dict(loaded.named_linears())
        assert linears.keys() == ours_linears.keys()
        for name, linear in linears.items():
            want, got = bn.unpack(ours_linears[name].weight), bn.unpack(linear.weight)
            assert np.array_equal(got.codes, want.codes), (fmt, name)
            # i2_s keeps the float32 scale; the TQ types keep it as fp16
            scale = want.scale if fmt == "i2_s" else want.scale.astype(np.float16).astype(np.float32)
            assert np.array_equal(got.scale, scale), (fmt, name)
        if fmt == "i2_s":
            for ids in PROMPTS:
                np.testing.assert_array_equal(loaded.forward(ids), ours.forward(ids))
            assert loaded.generate(PROMPTS[1], 8) == ours.generate(PROMPTS[1], 8)
        else:
            # Scales moved by up to 2**-11 move every activation a little, so codes at a
            # rounding boundary flip in most prompts: only the flip tolerance holds.
            errors = [relative_error(loaded.forward(ids), ours.forward(ids)) for ids in PROMPTS]
            assert max(errors) <= FLIP_TOLERANCE, (fmt, errors)


def test_from_pretrained_continues_from_the_checkpoint(exported):
    _, path, _ = exported
    ours = bn.load_pretrained(path)
    restored = from_pretrained(path).eval()
    stored = checkpoint_ternary(path)
    layers = {name: m for name, m in restored.named_modules() if isinstance(m, BitLinear)}
    assert layers.keys() == stored.keys()
    for name, layer in layers.items():
        codes, scale = layer.ternary()
        assert np.array_equal(codes.numpy(), stored[name].codes), name
        np.testing.assert_allclose(scale.numpy(), stored[name].scale, rtol=2**-22, atol=0, err_msg=name)
    assert_logits_match(lambda ids: torch_logits(restored, ids), ours.forward)
    assert torch_greedy(restored, PROMPTS[1], 8) == ours.generate(PROMPTS[1], 8)
    # Exported again, it gives the same checkpoint codes.
    again = checkpoint_ternary(export_pretrained(restored, path.parent / "again"))
    assert all(np.array_equal(again[name].codes, stored[name].codes) for name in stored)


def test_per_channel_model_exports_to_gguf_only(tmp_path):
    model = trained_model(tied=True, granularity="channel", seed=5)
    with pytest.raises(bn.FormatError, match="per-channel"):
        export_pretrained(model, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()

    numpy_model = to_bitnet(model)
    for name, linear in numpy_model.named_linears():
        layer = model.get_submodule(name)
        codes, scale = layer.ternary()
        ternary = bn.unpack(linear.weight)
        assert ternary.granularity == "channel" and np.array_equal(ternary.codes, codes.numpy()), name
        assert np.array_equal(ternary.scale, scale.numpy()), name
    assert_logits_match(numpy_model.forward, lambda ids: torch_logits(model, ids))

    file = tmp_path / "channel.gguf"
    bn.save_gguf(numpy_model, file, "tq2_0")
    loaded = bn.load_gguf(file)
    errors = [relative_error(loaded.forward(ids), torch_logits(model, ids)) for ids in PROMPTS]
    assert max(errors) <= FLIP_TOLERANCE, errors


def test_to_bitnet_refuses_a_float_projection():
    model = build_model(model_config(True), seed=6)
    mlp = model.model.layers[1].mlp
    mlp.up_proj = nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)
    with pytest.raises(bn.ConfigError, match=r"model\.layers\.1\.mlp\.up_proj.*replace_linear"):
        to_bitnet(model)
    set_quantization(model, 0.0)  # the float forward runs; only the export refuses
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()

"""Model families transformers ships no class for: 1bitLLM's ``bitnet_b1_58`` (model_type "llama",
``BitnetForCausalLM``: SiLU-gated MLP, sub-norms named ``inner_attn_ln`` / ``ffn_layernorm``, float
checkpoints quantized on load), against a plain numpy forward written from 1bitLLM's published
``modeling_bitnet.py`` and ``utils_quant.py`` (float64, fake quantization as they do it:
``round(w / mean|w|)`` and ``round(x * 127 / max|x|)``).

Tolerance as in test_model_hf.py: float32 against float64 agrees to ~1e-6 of the logit range
unless an int8 activation lands on the other side of a rounding boundary (then < 2e-2).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import bitnet as bn

pytest.importorskip("safetensors")
pytest.importorskip("ml_dtypes")

EXACT_TOLERANCE = 1e-5
FLIP_TOLERANCE = 2e-2
PROMPTS = [[1], [5, 17, 42, 7, 9, 3], list(range(2, 60, 3)), [6, 11, 11, 11, 64, 8, 30, 2, 90, 45, 12]]


def write_one_bit_llm(path, *, hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2, vocab=100, seed=0):
    """A random 1bitLLM-style checkpoint (float weights, config.json as 1bitLLM publishes it); returns the weights."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    d = hidden // heads
    weights = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
               "model.norm.weight": rng.uniform(0.8, 1.2, hidden).astype(np.float32)}
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_heads * d, hidden),
              "self_attn.v_proj": (kv_heads * d, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    norms = {"input_layernorm": hidden, "post_attention_layernorm": hidden, "self_attn.inner_attn_ln": hidden,
             "mlp.ffn_layernorm": intermediate}
    for i in range(layers):
        for name, shape in shapes.items():
            weights[f"model.layers.{i}.{name}.weight"] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        for name, size in norms.items():
            weights[f"model.layers.{i}.{name}.weight"] = rng.uniform(0.8, 1.2, size).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "model.safetensors"))
    config = {"architectures": ["BitnetForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": hidden, "intermediate_size": intermediate, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "num_hidden_layers": layers, "vocab_size": vocab,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
              "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "input_bits": 8, "weight_bits": 1}
    (path / "config.json").write_text(json.dumps(config))
    return weights, config


def reference_logits(weights, config, ids):
    """1bitLLM's forward in float64 numpy: Llama with BitLinear fake quantization and two sub-norms."""
    eps, heads, kv_heads = config["rms_norm_eps"], config["num_attention_heads"], config["num_key_value_heads"]
    d = config["hidden_size"] // heads
    w = {name: t.astype(np.float64) for name, t in weights.items()}

    def rms(x, weight):
        return weight * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    def bitlinear(x, weight):  # utils_quant.BitLinear: activation_quant(x) @ weight_quant(W).T
        s = 1.0 / max(np.abs(weight).mean(), 1e-5)
        wq = np.clip(np.rint(weight * s), -1, 1) / s
        a = 127.0 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
        return (np.clip(np.rint(x * a), -128, 127) / a) @ wq.T

    n = len(ids)
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, d, 2) / d)
    angles = np.arange(n)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(np.concatenate([angles, angles], 1)), np.sin(np.concatenate([angles, angles], 1))

    def rope(x):  # (n, heads, d), HF rotate_half
        rotated = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * cos[:, None] + rotated * sin[:, None]

    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope(bitlinear(h, w[p + "self_attn.q_proj.weight"]).reshape(n, heads, d))
        k = rope(bitlinear(h, w[p + "self_attn.k_proj.weight"]).reshape(n, kv_heads, d))
        v = bitlinear(h, w[p + "self_attn.v_proj.weight"]).reshape(n, kv_heads, d)
        k, v = (np.repeat(t, heads // kv_heads, axis=1) for t in (k, v))
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = np.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * d)
        x = x + bitlinear(rms(context, w[p + "self_attn.inner_attn_ln.weight"]), w[p + "self_attn.o_proj.weight"])
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = bitlinear(h, w[p + "mlp.gate_proj.weight"]), bitlinear(h, w[p + "mlp.up_proj.weight"])
        hidden = rms(gate / (1 + np.exp(-gate)) * up, w[p + "mlp.ffn_layernorm.weight"])
        x = x + bitlinear(hidden, w[p + "mlp.down_proj.weight"])
    return rms(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T


@pytest.fixture(scope="module", params=[dict(), dict(heads=4, kv_heads=4, hidden=96, intermediate=160, seed=1)])
def one_bit_llm(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("1bitllm")
    weights, config = write_one_bit_llm(path, **request.param)
    return path, weights, config


def test_one_bit_llm_config_is_silu_with_its_sub_norm_names(one_bit_llm):
    path, _, _ = one_bit_llm
    config = bn.io.read_config(path)
    assert (config.model_type, config.hidden_act, config.sub_norms) == ("llama", "silu", True)
    assert config.sub_norm_names == ("self_attn.inner_attn_ln", "mlp.ffn_layernorm")


def test_one_bit_llm_logits_and_greedy_tokens_match_its_modeling_code(one_bit_llm):
    path, weights, config = one_bit_llm
    model = bn.load_pretrained(path)
    errors = []
    for ids in PROMPTS:
        ours, ref = model.forward(np.array(ids)), reference_logits(weights, config, np.array(ids))
        errors.append(float(np.abs(ours - ref).max() / np.abs(ref).max()))
    assert max(errors) <= FLIP_TOLERANCE, errors
    assert sum(e <= EXACT_TOLERANCE for e in errors) >= len(errors) / 2, errors
    ids = list(PROMPTS[1])
    for _ in range(8):  # greedy decoding with the reference, one full forward per token
        ids.append(int(np.argmax(reference_logits(weights, config, np.array(ids))[-1])))
    assert model.generate(PROMPTS[1], 8, stop=[]) == ids[len(PROMPTS[1]):]


def test_one_bit_llm_saved_packed_loads_back_the_same(one_bit_llm, tmp_path):
    path, _, _ = one_bit_llm
    model = bn.load_pretrained(path)
    bn.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["architectures"] == ["BitnetForCausalLM"]
    ids = np.array(PROMPTS[2])
    np.testing.assert_array_equal(bn.load_pretrained(tmp_path).forward(ids), model.forward(ids))


def test_float_llama_is_not_a_ternary_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(bn.ConfigError, match="not ternary"):
        bn.load_pretrained(tmp_path)

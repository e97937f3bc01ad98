"""bn.io.describe and python -m bitnet info: what a model file holds, from its headers.

Figures are checked against the model that was written (its config, codes and scales) and
against the formats' sizes written out here, not against another run of describe.
"""

from __future__ import annotations

import json
import shutil

import pytest

import bitnet as bn
from bitnet.cli import main
from bitnet.models.random import random_model

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=0,
              tie_word_embeddings=False)
BITS_PER_WEIGHT = {"TQ2_0": 66 * 8 / 256, "TQ1_0": 54 * 8 / 256}  # ggml's block bytes per 256 weights


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The model, and it saved as an HF directory (with the bundled tokenizer) and as each GGUF type."""
    path = tmp_path_factory.mktemp("models")
    model = random_model(bn.BitNetConfig(**CONFIG), seed=1, head_dtype="f16")
    bn.save_pretrained(model, path / "hf")
    shutil.copy(bn.models.bundled_path() / "tokenizer.json", path / "hf")
    tokenizer = bn.load_tokenizer(path / "hf")
    for format in ("tq2_0", "tq1_0", "i2_s"):
        bn.save_gguf(model, path / f"{format}.gguf", format, tokenizer)
    return path, model


def expected_parameters(c: bn.BitNetConfig) -> int:
    """Weights of the network the config describes, counted from its definition."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, i = c.hidden_size, c.intermediate_size
    projections = h * q + 2 * h * kv + q * h + 3 * h * i
    norms = 2 * h + q + i  # input, post-attention, attention and FFN sub-norms
    tables = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    return c.num_hidden_layers * (projections + norms) + h + tables


def scale_range(model) -> tuple[float, float]:
    scales = [float(bn.unpack(linear.weight).scale) for _, linear in model.named_linears()]
    return min(scales), max(scales)


def test_an_hf_directory(written):
    path, model = written
    info = bn.io.describe(path / "hf")
    config = bn.BitNetConfig(**CONFIG)
    a = info["architecture"]
    assert (info["kind"], a["model_type"], a["hidden_act"], a["sub_norms"], a["gguf_architecture"]) == (
        "hf", "bitnet", "relu2", True, "bitnet-b1.58")
    assert (a["layers"], a["hidden_size"], a["kv_heads"], a["context"], a["tied_embeddings"]) == (2, 256, 2, 128, False)
    assert info["parameters"] == expected_parameters(config)
    projections = info["projections"]
    assert projections["formats"] == {"packed 2-bit (U8)": 14} and projections["bits_per_weight"] == 2.0
    assert projections["weights"] == sum(linear.weight.shape[0] * linear.weight.shape[1]
                                         for _, linear in model.named_linears())
    low, high = scale_range(model)
    assert projections["scale_min"] == pytest.approx(low, rel=1e-6)
    assert projections["scale_max"] == pytest.approx(high, rel=1e-6)
    assert info["tensors"]["formats"]["embedding"] == {"F16": 1} and info["tensors"]["formats"]["head"] == {"F16": 1}
    assert info["tensors"]["count"] == len(info["tensors"]["list"]) == 14 * 2 + 2 * 4 + 1 + 2
    assert info["file_size"] == sum(f.stat().st_size for f in (path / "hf").iterdir())
    assert info["bits_per_parameter"] == pytest.approx(8 * info["file_size"] / info["parameters"])
    tokenizer = bn.load_tokenizer(path / "hf")
    assert info["tokenizer"] == {"present": True, "kind": "byte-level BPE", "vocab_size": tokenizer.get_vocab_size(),
                                 "chat_template": False}


@pytest.mark.parametrize("format, type_name", [("tq2_0", "TQ2_0"), ("tq1_0", "TQ1_0"), ("i2_s", "I2_S")])
def test_a_gguf_file(written, format, type_name):
    path, model = written
    info = bn.io.describe(path / f"{format}.gguf")
    assert info["kind"] == "gguf" and info["architecture"]["gguf_architecture"] == "bitnet-b1.58"
    assert info["parameters"] == expected_parameters(bn.BitNetConfig(**CONFIG))
    projections = info["projections"]
    assert projections["formats"] == {type_name: 14}
    if type_name in BITS_PER_WEIGHT:
        assert projections["bits_per_weight"] == BITS_PER_WEIGHT[type_name]
    else:  # 2 bits, and a 32-byte tail per tensor
        tails = 14 * 32 * 8 / projections["weights"]
        assert projections["bits_per_weight"] == pytest.approx(2 + tails)
    low, high = scale_range(model)
    rel = 1e-3 if format.startswith("tq") else 1e-6  # TQ keeps fp16 block scales
    assert projections["scale_min"] == pytest.approx(low, rel=rel)
    assert projections["scale_max"] == pytest.approx(high, rel=rel)
    assert info["tensors"]["formats"]["norm"] == {"F32": 9} and info["tensors"]["formats"]["head"] == {"F16": 1}
    assert info["file_size"] == (path / f"{format}.gguf").stat().st_size
    tokenizer = info["tokenizer"]
    assert tokenizer["present"] and tokenizer["kind"].startswith("byte-level BPE")
    assert tokenizer["vocab_size"] == bn.load_tokenizer(path / "hf").get_vocab_size()


def test_no_tokenizer_and_a_chat_template(written, tmp_path):
    path, model = written
    bn.save_pretrained(model, tmp_path)
    assert bn.io.describe(tmp_path)["tokenizer"] == {"present": False}
    assert bn.io.read_chat_template(tmp_path) is None
    shutil.copy(path / "hf" / "tokenizer.json", tmp_path)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert bn.io.describe(tmp_path)["tokenizer"]["chat_template"] is True
    assert bn.io.read_chat_template(tmp_path) == template


def test_the_command_prints_text_or_json(written, capsys):
    path, _ = written
    assert main(["info", str(path / "tq2_0.gguf")]) == 0
    text = capsys.readouterr().out
    for expected in ("GGUF file", "GGUF architecture bitnet-b1.58", "relu2 MLP", "14 x TQ2_0", "2.062 bits/weight",
                     f"parameters: {expected_parameters(bn.BitNetConfig(**CONFIG)):,}", "4,096 tokens"):
        assert expected in text, (expected, text)
    assert main(["info", str(path / "hf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["projections"]["formats"] == {"packed 2-bit (U8)": 14}
    assert {entry["name"] for entry in info["tensors"]["list"]} >= {"model.layers.1.mlp.down_proj.weight_scale"}


def test_a_missing_or_corrupt_file_is_one_error_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err == f"error: model directory {tmp_path / 'absent'} does not exist\n"
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(20))
    assert main(["info", str(tmp_path / "bad.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1

"""bn.io.convert_checkpoint and python -m bitnet convert: every source kind to every target format.

The converted file is loaded back and compared with the model that was written (its ternary
codes exactly, its scales to the target's precision, its logits), and its tokenizer with the
source's encodings; float checkpoints against absmean written out in numpy.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import bitnet as bn
from bitnet.cli import main
from bitnet.models.random import random_model

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

# Widths of 256 so TQ1_0/TQ2_0 (256-weight blocks) hold every projection; the bundled tokenizer's 4096 ids.
CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64, bos_token_id=None, eos_token_id=0)
TEXT = "def parse(self, text):\n    return text.split()"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An HF packed directory with a tokenizer and sampling defaults, and the model written to it."""
    path = tmp_path_factory.mktemp("source")
    model = random_model(bn.BitNetConfig(**CONFIG), seed=3)
    bn.save_pretrained(model, path)
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(bn.models.bundled_path() / name, path)
    return path, model


def codes_and_scales(model) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(bn.unpack(linear.weight).codes, np.asarray(bn.unpack(linear.weight).scale))
            for _, linear in model.named_linears()]


@pytest.mark.parametrize("format", ["hf", "tq2_0", "tq1_0", "i2_s"])
def test_an_hf_directory_converts_to_every_format(source, tmp_path, format):
    path, model = source
    destination = tmp_path / ("out" if format == "hf" else "out.gguf")
    reports = []
    result = bn.io.convert_checkpoint(path, destination, format, progress=lambda *report: reports.append(report))
    weights = model.config.weight_count()
    assert weights == len(dict(model.config.weight_shapes()))
    reads = [(done, total) for stage, done, total in reports if stage == "read"]
    assert reads == [(done, weights) for done in range(1, weights + 1)]  # one report per weight read
    later = [report for report in reports if report[0] != "read"]
    assert later == [("write", 0, 1), ("write", 1, 1)] + (
        [("tokenizer", 0, 1), ("tokenizer", 1, 1)] if format == "hf" else [])
    assert result.destination == destination and result.format == format and result.tokenizer
    assert result.nbytes == (sum(f.stat().st_size for f in destination.iterdir()) if format == "hf"
                             else destination.stat().st_size)
    converted = bn.load_pretrained(destination)
    for (codes, scale), (got_codes, got_scale) in zip(codes_and_scales(model), codes_and_scales(converted),
                                                      strict=True):
        np.testing.assert_array_equal(got_codes, codes)
        # TQ keeps fp16 block scales; HF packed and I2_S keep the float32 scale.
        expected = scale.astype(np.float16).astype(np.float32) if format.startswith("tq") else scale
        np.testing.assert_array_equal(got_scale, expected)
    ids = np.arange(1, 17)
    tolerance = 2e-3 if format.startswith("tq") else 0  # fp16-rounded scales shift the logits slightly
    np.testing.assert_allclose(converted.forward(ids), model.forward(ids), rtol=tolerance, atol=tolerance)
    original, tokenizer = bn.load_tokenizer(path), bn.load_tokenizer(destination)
    assert tokenizer.encode(TEXT).ids == original.encode(TEXT).ids
    if format == "hf":
        assert bn.io.read_generation_config(destination) == bn.io.read_generation_config(path)


def test_a_gguf_file_converts_back_to_an_hf_directory(source, tmp_path):
    path, model = source
    bn.io.convert_checkpoint(path, tmp_path / "m.gguf", "i2_s")
    bn.io.convert_checkpoint(tmp_path / "m.gguf", tmp_path / "hf", "hf", head="bf16")
    back = bn.load_pretrained(tmp_path / "hf")
    for (codes, scale), (got_codes, got_scale) in zip(codes_and_scales(model), codes_and_scales(back), strict=True):
        np.testing.assert_array_equal(got_codes, codes)
        np.testing.assert_array_equal(got_scale, scale)
    assert back.embed_tokens.dtype == "bf16"
    assert bn.load_tokenizer(tmp_path / "hf").encode(TEXT).ids == bn.load_tokenizer(path).encode(TEXT).ids


def test_a_float_checkpoint_is_quantized_with_absmean(source, tmp_path):
    """Float projections become absmean's codes and scale, written in numpy: s = mean|w|, round(w / s) in [-1, 1]."""
    path, model = source
    config = bn.BitNetConfig(**CONFIG)
    raw = config.to_dict()
    raw.pop("quantization_config")
    rng = np.random.default_rng(5)
    tensors = {name: norm.weight for name, norm in model.named_norms()}
    tensors["model.embed_tokens.weight"] = model.embed_tokens.float_weights()
    floats = {}
    for name, linear in model.named_linears():
        floats[name] = tensors[f"{name}.weight"] = (rng.standard_normal(linear.weight.shape) * 0.02).astype(np.float32)
    (tmp_path / "float").mkdir()
    safetensors_numpy.save_file(tensors, str(tmp_path / "float" / "model.safetensors"))
    (tmp_path / "float" / "config.json").write_text(json.dumps(raw))
    result = bn.io.convert_checkpoint(tmp_path / "float", tmp_path / "m.gguf", "tq2_0")
    assert not result.tokenizer
    converted = dict(bn.load_pretrained(tmp_path / "m.gguf").named_linears())
    for name, w in floats.items():
        scale = np.float32(np.abs(w.astype(np.float64)).mean())
        codes = np.clip(np.round(w / scale), -1, 1).astype(np.int8)
        got = bn.unpack(converted[name].weight)
        np.testing.assert_array_equal(got.codes, codes)
        assert got.scale == np.float32(np.float16(scale))


def test_an_existing_destination_is_refused_unless_overwrite(source, tmp_path):
    path, _ = source
    destination = tmp_path / "m.gguf"
    destination.write_bytes(b"keep me")
    with pytest.raises(bn.errors.OutputExistsError, match="exists"):
        bn.io.convert_checkpoint(path, destination, "tq2_0")
    assert destination.read_bytes() == b"keep me"
    bn.io.convert_checkpoint(path, destination, "tq2_0", overwrite=True)
    assert bn.io.describe(destination)["projections"]["formats"] == {"TQ2_0": 7}


def test_a_destination_of_the_wrong_kind_or_a_sharded_one_is_refused(source, tmp_path):
    path, _ = source
    with pytest.raises(bn.errors.OutputExistsError, match="is a directory"):
        bn.io.convert_checkpoint(path, tmp_path, "i2_s", overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(bn.errors.OutputExistsError, match="is a file"):
        bn.io.convert_checkpoint(path, tmp_path / "file", "hf", overwrite=True)
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(bn.errors.OutputExistsError, match="sharded"):
        bn.io.convert_checkpoint(path, tmp_path / "sharded", "hf", overwrite=True)


def test_overwriting_an_hf_directory_removes_a_tokenizer_the_source_lacks(source, tmp_path):
    path, model = source
    bn.save_pretrained(model, tmp_path / "bare")  # no tokenizer
    bn.io.convert_checkpoint(path, tmp_path / "out", "hf")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    bn.io.convert_checkpoint(tmp_path / "bare", tmp_path / "out", "hf", overwrite=True)
    assert bn.load_tokenizer(tmp_path / "out") is None


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "q4_0"}, "unknown target format 'q4_0'"),
    ({"format": "hf", "head": "int4"}, "unknown head dtype 'int4'"),
])
def test_bad_settings_are_refused_before_any_work(source, tmp_path, kwargs, message):
    with pytest.raises(bn.InvalidValueError, match=message):
        bn.io.convert_checkpoint(source[0], tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_the_command_converts_and_refuses_in_one_line(source, tmp_path, capsys):
    path, _ = source
    destination = tmp_path / "m.gguf"
    assert main(["convert", str(path), str(destination), "--format", "tq1_0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{destination}: tq1_0, 13 tensors") and "with its tokenizer" in out
    assert main(["convert", str(path), str(destination), "--format", "tq1_0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: {destination} exists") and "--overwrite" in captured.err
    assert main(["convert", str(path), str(destination), "--format", "tq2_0", "--overwrite"]) == 0
    assert main(["convert", str(path), str(destination), "--format", "q8_0"]) == 2
    assert "invalid choice: 'q8_0'" in capsys.readouterr().err


def test_a_progress_that_is_not_callable_is_refused_before_reading(source, tmp_path):
    path, _ = source
    for call in (lambda: bn.io.convert_checkpoint(path, tmp_path / "out.gguf", "i2_s", progress=5),
                 lambda: bn.load_pretrained(path, progress="bar")):
        with pytest.raises(bn.InvalidValueError, match="progress must be callable"):
            call()
    assert not (tmp_path / "out.gguf").exists()

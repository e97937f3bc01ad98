"""Fuzzing the HF checkpoint loader: a mutated checkpoint loads and runs, or raises ``bn.BitNetError``.

A tiny model is saved once; each case copies it with one or a few mutations drawn from the
ways real checkpoints go wrong: ``config.json`` values of the wrong type or range, a
``weight_scale`` of 0 / NaN / Inf / negative / extreme, NaN norms, tensors missing, extra
(more layers than the config), transposed or of another dtype, a sharded index naming
files outside the directory (``../x``, absolute paths) or missing, and flipped bytes in the
safetensors header. Describing it (``bn.io.describe``) and loading it (then a forward pass)
must work or raise ``bn.BitNetError``;
a model that loads must give finite logits. The default run has 150 cases;
``pytest -m slow`` runs many more.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import bitnet as bn
from bitnet.models.random import random_model

safetensors_numpy = pytest.importorskip("safetensors.numpy")

SEED = 20261201
IDS = np.array([0, 3, 7, 1])
CONFIG = dict(vocab_size=24, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1)
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "model_type", "rope_parameters",
               "quantization_config")
ODD_VALUES = (None, 0, -1, 1, 3, 2**31, 1.5, float("nan"), float("inf"), "8", "", [], [4], {}, True,
              {"rope_type": "llama3"}, {"quant_method": "bitnet", "linear_class": "nope"})
SCALES = (0.0, -0.5, np.nan, np.inf, -np.inf, 1e-38, 1e38)
SHARDS = ("../outside.safetensors", "/etc/passwd", "missing.safetensors", "model.safetensors",
          "sub/../model.safetensors")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_fuzz") / "model"
    bn.save_pretrained(random_model(bn.BitNetConfig(**CONFIG), seed=3), path)
    return path


def mutate(src, dst, rng) -> list[str]:
    """Copy checkpoint ``src`` to ``dst`` with 1-3 random mutations; returns what was done."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    tensors = safetensors_numpy.load_file(dst / "model.safetensors")
    done = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(6))
        names = sorted(tensors)
        name = names[int(rng.integers(len(names)))]
        if kind == 0:
            key = CONFIG_KEYS[int(rng.integers(len(CONFIG_KEYS)))]
            config[key] = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
            done.append(f"config {key}={config[key]!r}")
        elif kind == 1:
            scales = [n for n in names if n.endswith("weight_scale")]
            name = scales[int(rng.integers(len(scales)))]
            tensors[name] = np.full_like(tensors[name], SCALES[int(rng.integers(len(SCALES)))])
            done.append(f"{name}={tensors[name]}")
        elif kind == 2:
            norms = [n for n in names if "norm" in n]
            name = norms[int(rng.integers(len(norms)))]
            tensors[name] = tensors[name].astype(np.float32)  # a copy, float even if retyped by an earlier mutation
            tensors[name].flat[int(rng.integers(tensors[name].size))] = rng.choice([np.nan, np.inf])
            done.append(f"non-finite {name}")
        elif kind == 3:
            change = int(rng.integers(3))
            if change == 0:
                del tensors[name]
            elif change == 1:
                tensors[name.replace("layers.1.", f"layers.{int(rng.integers(2, 5))}.")] = tensors[name]
            else:
                tensors[name] = np.ascontiguousarray(np.atleast_2d(tensors[name]).T.astype(
                    rng.choice([np.float32, np.float16, np.uint8, np.int64])))
            done.append(f"{('drop', 'copy to a later layer', 'transpose/retype')[change]} {name}")
        elif kind == 4:
            shard = SHARDS[int(rng.integers(len(SHARDS)))]
            weight_map = {n: "model.safetensors" for n in tensors}
            weight_map[name] = shard
            (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
            done.append(f"index: {name} in {shard}")
        else:
            done.append("header bytes flipped")
    (dst / "config.json").write_text(json.dumps(config))
    safetensors_numpy.save_file(tensors, dst / "model.safetensors")
    if done[-1] == "header bytes flipped":
        data = bytearray((dst / "model.safetensors").read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        for position in rng.integers(0, header, int(rng.integers(1, 5))):
            data[position] ^= int(rng.integers(1, 256))
        (dst / "model.safetensors").write_bytes(bytes(data))
    return done


def describe(path) -> None:
    """``bn.io.describe`` (python -m bitnet info) of the checkpoint: a summary, or a BitNetError."""
    try:
        bn.io.describe(path)
    except bn.BitNetError:
        pass


def run_cases(original, tmp_path, cases: int, seed: int) -> int:
    loaded = 0
    for case in range(cases):
        rng = np.random.default_rng([seed, case])
        target = tmp_path / f"case{case}"
        done = mutate(original, target, rng)
        try:
            describe(target)
            model = bn.load_pretrained(target)
            logits = model(IDS)
        except bn.BitNetError:
            continue
        except Exception as exc:
            pytest.fail(f"case {case} (seed {seed}; {done}): {type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(target)
        assert np.isfinite(logits).all(), f"case {case} (seed {seed}; {done}) loaded and gave non-finite logits"
        loaded += 1
    return loaded


def test_original_loads(original):
    assert np.isfinite(bn.load_pretrained(original)(IDS)).all()


def test_fuzz_mutated_checkpoints(original, tmp_path):
    loaded = run_cases(original, tmp_path, 150, SEED)
    assert 0 < loaded < 150  # some mutations are harmless (e.g. an equal value), most are refused


@pytest.mark.slow
def test_fuzz_mutated_checkpoints_long(original, tmp_path):
    run_cases(original, tmp_path, 5000, SEED + 1)

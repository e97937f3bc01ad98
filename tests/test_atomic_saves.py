"""Saves never destroy: a save that fails half way leaves the old files intact and no temporary behind.

The disk-full case is a child process whose file size limit (RLIMIT_FSIZE, with SIGXFSZ
ignored so that write() fails with EFBIG) is below the size of the file being written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bitnet as bn
from bitnet.models.random import random_model

pytest.importorskip("gguf")
pytest.importorskip("safetensors")
resource = pytest.importorskip("resource")

CONFIG = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
IDS = np.array([1, 5, 9, 3])


def model(seed: int, **overrides) -> bn.BitNetForCausalLM:
    return random_model(bn.BitNetConfig(**{**CONFIG, **overrides}), seed=seed, head_dtype="f32")


def save_in_child_with_file_limit(call: str, limit: int) -> subprocess.CompletedProcess:
    """Run ``call`` (a save of ``model(1)``) in a child whose files cannot grow past ``limit`` bytes."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import bitnet as bn
        from tests.test_atomic_saves import model
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
            {call}
        except Exception as exc:  # OSError from gguf's writer, SafetensorError from safetensors
            print("failed:", exc)
            sys.exit(3)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)


def snapshot(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_gguf_save_that_runs_out_of_space_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.gguf"
    bn.save_gguf(model(0), path, "tq2_0")
    before, expected = snapshot(tmp_path), bn.load_gguf(path)(IDS)
    done = save_in_child_with_file_limit(f"bn.save_gguf(model(1), {str(path)!r}, 'tq2_0')", len(before["m.gguf"]) // 2)
    assert done.returncode == 3 and "failed:" in done.stdout, done.stdout + done.stderr
    assert snapshot(tmp_path) == before  # same bytes, and no temporary left
    np.testing.assert_array_equal(bn.load_gguf(path)(IDS), expected)


def test_hf_save_that_runs_out_of_space_keeps_weights_and_config_together(tmp_path):
    bn.save_pretrained(model(0), tmp_path)
    before = snapshot(tmp_path)
    limit = len(before["model.safetensors"]) // 2
    done = save_in_child_with_file_limit(f"bn.save_pretrained(model(1), {str(tmp_path)!r})", limit)
    assert done.returncode == 3 and "failed:" in done.stdout, done.stdout + done.stderr
    assert snapshot(tmp_path) == before
    np.testing.assert_array_equal(bn.load_pretrained(tmp_path)(IDS), model(0)(IDS))


def test_a_save_refused_half_way_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.gguf"
    bn.save_gguf(model(0), path, "tq2_0")
    before = snapshot(tmp_path)
    narrow = model(1, intermediate_size=384)  # down_proj has 384 inputs: TQ2_0 refuses it, after other tensors
    with pytest.raises(bn.GGUFError, match="multiple of 256"):
        bn.save_gguf(narrow, path, "tq2_0")
    assert snapshot(tmp_path) == before


def test_a_successful_save_replaces_the_files_and_leaves_nothing_else(tmp_path):
    bn.save_gguf(model(0), tmp_path / "m.gguf", "i2_s")
    bn.save_pretrained(model(0), tmp_path)
    bn.save_gguf(model(1), tmp_path / "m.gguf", "i2_s")
    bn.save_pretrained(model(1), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "m.gguf", "model.safetensors"]
    expected = model(1)(IDS)
    np.testing.assert_array_equal(bn.load_gguf(tmp_path / "m.gguf")(IDS), expected)
    np.testing.assert_array_equal(bn.load_pretrained(tmp_path)(IDS), expected)

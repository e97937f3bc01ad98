"""The command line: a user mistake gives one ``error: ...`` line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import bitnet as bn
from bitnet.cli import main
from bitnet.models.random import random_model

pytest.importorskip("tokenizers")


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitnet", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["bench", "--threads", "0"], "--threads: 0 is below 1"),
    (["bench", "--threads", "two"], "'two' is not a whole number"),
    (["bench", "--paths", "bogus"], "'bogus' is not a kernel path this CPU runs"),
    (["bench", "--min-time", "nan"], "must be a positive number"),
    (["bench-model", "--layers", "-3"], "--layers: -3 is below 1"),
    (["bench-model", "--decode-tokens", "0"], "--decode-tokens: 0 is below 1"),
    (["demo", "--out-features", "0"], "--out-features: 0 is below 1"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens: -1 is below 1"),
    (["generate", "--prompt", "x", "--seed", "-2"], "--seed: -2 is below 0"),
    (["generate"], "the following arguments are required: --prompt"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_flags_are_refused_in_one_line(capsys, args, message):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err
    assert captured.err.count("\n") == 1, captured.err


def test_an_unsupported_thread_count_is_refused_by_the_library(capsys):
    too_many = bn.get_num_threads() + 1000
    assert main(["bench-model", "--layers", "1", "--threads", str(too_many)]) == 2
    assert "threads must be an integer in [1, " in capsys.readouterr().err


def test_a_prompt_whose_ids_the_model_lacks_is_refused_before_any_output(tmp_path, capsys):
    config = bn.BitNetConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, bos_token_id=None, eos_token_id=None)
    bn.save_pretrained(random_model(config), tmp_path)
    shutil.copy(bn.models.bundled_path() / "tokenizer.json", tmp_path)  # 4096 ids for a 64-id model
    assert main(["generate", str(tmp_path), "--prompt", "import numpy as np", "--max-new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and "[0, 64)" in captured.err


def test_the_module_entry_point_prints_no_traceback():
    done = run_module("bench-model", "--layers", "-1")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    done = run_module("generate", "/nonexistent/model", "--prompt", "hi")
    assert done.returncode == 2 and done.stderr == "error: model directory /nonexistent/model does not exist\n"

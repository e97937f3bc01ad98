"""The command line: a user mistake gives one ``error: ...`` line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata

import pytest

import bitnet as bn
from bitnet import bench, cli
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
    (["generate"], "one of the arguments --prompt --chat is required"),
    (["generate", "--prompt", "x", "--chat"], "not allowed with argument"),
    (["convert", "a", "b"], "the following arguments are required: --format"),
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


def test_version_is_the_installed_distribution_s():
    done = run_module("--version")
    assert done.returncode == 0 and done.stdout == f"python -m bitnet {metadata.version('bitnet-numba')}\n"


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {"": parser, **choices}


@pytest.mark.parametrize("name", ["", "demo", "generate", "convert", "info", "bench", "bench-model"])
def test_help_is_plain_text_showing_defaults(name):
    parser = subcommand_parsers()[name]
    text = parser.format_help()
    assert "``" not in text and ":func:" not in text and ":class:" not in text
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert action.help and "default" in cli._HelpFormatter("x")._get_help_string(action), action


def test_bench_model_defaults_to_the_int8_head_the_readme_quotes():
    bench_model = subcommand_parsers()["bench-model"]
    assert bench_model.parse_args([]).head == "int8"
    assert "int8 head" in bench_model.format_help()


def test_a_busy_machine_is_reported(monkeypatch):
    cpus = 4
    monkeypatch.setattr(cli.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (2.0, 0.0, 0.0))
    assert cli._load_note() is None
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (2.5, 0.0, 0.0))
    assert cli._load_note().startswith("note: load average 2.5 on 4 CPUs")


def test_generate_reports_timings_without_compilation():
    done = run_module("generate", "--prompt", "def ", "--max-new-tokens", "4", "--seed", "0")
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()
    stats = next(line for line in summary if line.startswith("prompt: "))
    assert "per token: min " in stats and " / median " in stats and "kernel warm-up" in stats


def greedy_reply(model, tokenizer, transcript: str, max_new_tokens: int) -> str:
    """The reply of the plain transcript format, computed with the library: greedy tokens, cut at the next turn."""
    ids = tokenizer.encode(transcript).ids
    text = tokenizer.decode(model.generate(ids, max_new_tokens))
    return text.split("\nUser:")[0].strip()


def test_chat_reads_turns_until_end_of_input():
    """Two lines, then EOF: two replies, each the model's greedy continuation of the transcript so far."""
    lines = ["import os", "def main():"]
    done = subprocess.run([sys.executable, "-m", "bitnet", "generate", "--chat", "--temperature", "0",
                           "--max-new-tokens", "12"], input="\n".join(lines) + "\n", capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "plain User:/Assistant: transcript" in done.stderr
    model, tokenizer = bn.load_pretrained(), bn.load_tokenizer()
    first = greedy_reply(model, tokenizer, f"User: {lines[0]}\nAssistant:", 12)
    second = greedy_reply(model, tokenizer, f"User: {lines[0]}\nAssistant: {first}\nUser: {lines[1]}\nAssistant:", 12)
    assert done.stdout == f"> {first}\n> {second}\n> \n"


def test_chat_refuses_a_reply_budget_the_context_cannot_hold(capsys):
    assert main(["generate", "--chat", "--max-new-tokens", "256"]) == 2
    assert "leaves no room for the conversation in the model's context of 256" in capsys.readouterr().err


def test_bench_plot_draws_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [bench.Row(256, 256, 1, 1, path, 1e-5, 8e-6, 4e-5) for path in ("avx2", "portable")]
    bench.plot(rows, tmp_path / "bench.png", "test")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_is_refused_before_timing(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    assert main(["bench", "--plot", str(tmp_path / "x.unknown")]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot plot to {tmp_path / 'x.unknown'}: its type")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert main(["bench", "--plot", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == "error: plotting needs matplotlib: pip install matplotlib\n"

"""bitnet.torch training: the loop, its resume and DDP runs, the schedule, the corpus rules, bad input.

Every run is tiny (one layer of 256, vocabulary 300, 32-token contexts, batch 4) on a corpus of
40 generated Python-like files, one thread per process. Oracles: an uninterrupted run for a
resumed one, a single-process run for a DDP one, bitnet's own numpy forward (with the
log-likelihood written out here) for the held-out bits per byte, hashlib for the held-out rule.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import bitnet as bn  # noqa: E402
from bitnet.torch import TrainConfig, learning_rate, read_log, train  # noqa: E402
from bitnet.torch.corpus import (  # noqa: E402
    bits_per_byte,
    is_held_out,
    numpy_window_nll,
    read_corpus,
    token_stream,
)

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
WORDS = ["self", "value", "result", "index", "items", "count", "name", "data", "config", "token", "model",
         "buffer", "offset", "length", "parser", "header", "key", "state", "weights", "scale"]


def python_like_line(rng) -> str:
    a, b, c = rng.choice(WORDS, 3)
    n = int(rng.integers(0, 1000))
    return [
        f"    {a} = {b}({c}, {n})",
        f"def {a}_{b}({c}, {a}=None):",
        f"    for {a} in {b}.{c}:",
        f"        return {a} + {b} * {n % 10}",
        f"class {a.title()}{b.title()}:",
        f"    if {a} is not None and {b} > {n}:",
        f"        {a}.{b}.append({c}[{n % 7}])",
        f'    """{a.title()} the {b} of {c}."""',
    ][int(rng.integers(0, 8))]


def write_corpus(root: Path, n_files: int = 40, lines: int = 30, seed: int = 0) -> Path:
    """``pkg{i % 3}/mod_{i}.py`` files of generated lines (3 of the 40 names are held out), and one .txt."""
    rng = np.random.default_rng(seed)
    for i in range(n_files):
        file = root / f"pkg{i % 3}" / f"mod_{i:02d}.py"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("\n".join(python_like_line(rng) for _ in range(lines)) + "\n")
    (root / "NOTES.txt").write_text("not python: the pattern leaves this file out\n")
    return root


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one torch and one Numba thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_config(out_dir, corpus_dir, **changes) -> TrainConfig:
    config = TrainConfig(
        out_dir=str(out_dir), corpus=str(corpus_dir), pattern="*.py", vocab_size=300, hidden_size=256,
        intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=2, context=32, batch_size=4, steps=STEPS,
        warmup_steps=4, compile=False, checkpoint_every=0, bf16=False,
    )
    return replace(config, **changes)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, corpus_dir):
    """One uninterrupted single-process run of ``STEPS`` steps: ``(config, result)``."""
    config = tiny_config(tmp_path_factory.mktemp("baseline") / "run", corpus_dir)
    return config, train(config, progress=False, threads=1)


def losses_of(out_dir) -> list[float]:
    return [record["loss"] for record in read_log(out_dir) if "loss" in record]


def snapshot(directory: Path) -> dict[str, bytes | None]:
    return {p.relative_to(directory).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


# ---------------------------------------------------------------------------------------------
# A run: loss, export, held-out bits per byte


def plain_bits_per_byte(model, stream: np.ndarray, n_bytes: int, context: int) -> float:
    """Summed NLL (nats) of every token after the first, predicted by windows of ``context`` tokens, over bytes."""
    total = 0.0
    for start in range(0, len(stream) - 1, context):
        window = stream[start : start + context + 1]
        logits = model.forward(window[:-1]).astype(np.float64)
        top = logits.max(axis=1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        total += float((log_z - logits[np.arange(len(window) - 1), window[1:]]).sum())
    return total / math.log(2) / n_bytes


def test_training_lowers_the_loss_and_exports_a_model(baseline, corpus_dir):
    config, result = baseline
    out = Path(config.out_dir)
    assert len(result.losses) == STEPS and all(math.isfinite(v) for v in result.losses)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.5, result.losses
    assert result.tokens == STEPS * config.batch_size * config.context
    assert result.model_dir == out / "model"

    log = read_log(out)
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(STEPS))
    assert [r["loss"] for r in steps] == result.losses
    assert [r["lr"] for r in steps] == [learning_rate(s, config)[0] for s in range(STEPS)]
    assert log[-1] == {"step": STEPS - 1, "held_out_bpb": result.held_out_bpb}
    summary = json.loads((out / "result.json").read_text())
    assert summary["held_out_bpb"] == result.held_out_bpb and math.isfinite(result.held_out_bpb)
    assert 0 < result.held_out_bpb < 8
    assert summary["final_loss"] == result.losses[-1]
    assert summary["config"] == asdict(config)

    # The held-out files are those of the md5 rule; their bytes are what bpb divides by.
    names = sorted(p.relative_to(corpus_dir).as_posix() for p in corpus_dir.rglob("*.py"))
    held_out = [n for n in names if int(hashlib.md5(n.encode()).hexdigest(), 16) % 20 == 0]
    assert len(held_out) == 3
    assert summary["held_out_bytes"] == sum((corpus_dir / n).stat().st_size for n in held_out)

    model = bn.load_pretrained(result.model_dir)
    tokenizer = bn.load_tokenizer(result.model_dir)
    assert model.config.vocab_size == 300 and model.config.num_hidden_layers == 1 and model.tied
    assert tokenizer.get_vocab_size() == 300 and tokenizer.token_to_id("<|endoftext|>") == 0
    texts = [(corpus_dir / n).read_text() for n in held_out]
    stream = token_stream(tokenizer, texts)
    assert stream[0] == 0 and stream[-1] == 0 and (stream == 0).sum() == len(texts) + 1
    assert tokenizer.decode(stream[1:-1].tolist(), skip_special_tokens=False).replace("<|endoftext|>", "") == "".join(
        texts
    )
    n_bytes = summary["held_out_bytes"]
    ours = bits_per_byte(numpy_window_nll(model), stream, n_bytes, config.context)
    assert ours == pytest.approx(plain_bits_per_byte(model, stream, n_bytes, config.context), rel=1e-9)
    assert ours == pytest.approx(result.held_out_bpb, rel=1e-3)
    # Trained for a few steps, far better than a uniform guess over the vocabulary.
    uniform = (len(stream) - 1) * math.log2(300) / n_bytes
    assert result.held_out_bpb < 0.8 * uniform


def test_package_level_train_is_the_function():
    """``bitnet.torch.train`` stays the function once the loop's module is imported (no submodule shadows it)."""
    import importlib

    import bitnet.torch

    importlib.import_module(train.__module__)
    assert callable(bitnet.torch.train) and bitnet.torch.train is train and train.__name__ == "train"
    assert bitnet.torch.TrainConfig is TrainConfig


# ---------------------------------------------------------------------------------------------
# Resume and DDP


def test_resumed_run_equals_uninterrupted_run(baseline, corpus_dir, tmp_path):
    config, result = baseline
    resumed = replace(config, out_dir=str(tmp_path / "run"))
    first = train(resumed, progress=False, threads=1, stop_at=10)
    assert first.held_out_bpb is None and first.model_dir is None and len(first.losses) == 10
    assert first.losses == result.losses[:10]
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not (tmp_path / "run" / "model").exists()

    before = snapshot(tmp_path / "run")
    with pytest.raises(bn.CheckpointError, match="peak_lr"):
        train(replace(resumed, peak_lr=1e-3), resume=True, progress=False, threads=1)
    assert snapshot(tmp_path / "run") == before

    second = train(resumed, resume=True, progress=False, threads=1)
    assert second.losses == result.losses
    assert losses_of(tmp_path / "run") == result.losses
    assert second.held_out_bpb == result.held_out_bpb
    assert second.tokens == (STEPS - 10) * config.batch_size * config.context
    assert (second.model_dir / "model.safetensors").read_bytes() == (
        result.model_dir / "model.safetensors"
    ).read_bytes()


DDP_SCRIPT = """\
import json, sys
from bitnet.torch import TrainConfig, train
train(TrainConfig(**json.loads(open(sys.argv[1]).read())), progress=False, threads=1)
"""


def test_ddp_run_matches_single_process(baseline, tmp_path):
    config, result = baseline
    ddp = replace(config, out_dir=str(tmp_path / "run"))
    (tmp_path / "config.json").write_text(json.dumps(asdict(ddp)))
    (tmp_path / "ddp_train.py").write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "ddp_train.py"), str(tmp_path / "config.json")]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:  # gloo could not start, or a rank failed: say so, do not skip
        pytest.fail(f"torchrun exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    # The all-reduce sums the two halves' gradients in another order than one process does, so
    # the weights drift apart by float rounding, which ternarization amplifies (a weight at a
    # rounding boundary of W / s flips its code): equal to ~1e-7 for the first steps, ~4e-4 by
    # step 24. A wrong batch split, scale or averaging is off by far more from the first step.
    losses = losses_of(tmp_path / "run")
    assert len(losses) == STEPS
    assert np.allclose(losses[:4], result.losses[:4], rtol=1e-5, atol=0), (losses, result.losses)
    assert np.allclose(losses[:10], result.losses[:10], rtol=1e-4, atol=0), (losses, result.losses)
    assert np.allclose(losses, result.losses, rtol=2e-3, atol=0), (losses, result.losses)
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    assert summary["held_out_bpb"] == pytest.approx(result.held_out_bpb, rel=1e-2)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Bad input


def test_empty_or_missing_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(bn.InvalidValueError, match=r"corpus .*empty.* 0 training and 0 held-out"):
        train(tiny_config(tmp_path / "out1", tmp_path / "empty"), progress=False, threads=1)
    with pytest.raises(bn.InvalidValueError, match="neither a file nor a directory"):
        train(tiny_config(tmp_path / "out2", tmp_path / "missing"), progress=False, threads=1)


def test_binary_file_in_corpus(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_files=6, lines=3)
    blob = corpus / "pkg1" / "blob.py"
    blob.write_bytes(b"import os\n\x00\xff\xfe\x80" + np.random.default_rng(1).bytes(200))
    with pytest.raises(bn.InvalidValueError, match=r"blob\.py is not UTF-8 text"):
        train(tiny_config(tmp_path / "out", corpus), progress=False, threads=1)
    blob.write_bytes(b"x = 1\n\x00\x00\x00y = 2\n")  # valid UTF-8, but NUL bytes
    with pytest.raises(bn.InvalidValueError, match=r"blob\.py holds NUL bytes"):
        read_corpus(corpus, "*.py")


@pytest.mark.parametrize("change, name", [({"hidden_size": 100}, "hidden_size"),
                                          ({"intermediate_size": 300}, "intermediate_size"),
                                          ({"num_heads": 3}, "num_heads"), ({"vocab_size": 200}, "vocab_size")])
def test_sizes_the_formats_cannot_hold(tmp_path, corpus_dir, change, name):
    with pytest.raises(bn.ConfigError, match=name):
        train(tiny_config(tmp_path / "out", corpus_dir, **change), progress=False, threads=1)
    assert not (tmp_path / "out").exists()


def test_existing_output_directory_is_left_alone(tmp_path, corpus_dir):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "checkpoint.pt").write_bytes(b"\x01\x02")
    before = snapshot(out)
    with pytest.raises(bn.errors.OutputExistsError, match="resume.*overwrite") as raised:
        train(tiny_config(out, corpus_dir), progress=False, threads=1)
    assert isinstance(raised.value, bn.BitNetError) and isinstance(raised.value, FileExistsError)
    assert snapshot(out) == before


def test_resume_from_a_corrupt_or_missing_checkpoint(tmp_path, corpus_dir):
    out = tmp_path / "out"
    out.mkdir()
    garbage = np.random.default_rng(2).bytes(3000)
    (out / "checkpoint.pt").write_bytes(garbage)
    with pytest.raises(bn.CheckpointError, match="corrupt") as raised:
        train(tiny_config(out, corpus_dir), resume=True, progress=False, threads=1)
    assert type(raised.value) is bn.CheckpointError
    assert (out / "checkpoint.pt").read_bytes() == garbage

    for missing in (tmp_path / "empty", tmp_path / "never-made"):
        if missing.name == "empty":
            missing.mkdir()
        with pytest.raises(bn.CheckpointNotFoundError, match="checkpoint.pt"):
            train(tiny_config(missing, corpus_dir), resume=True, progress=False, threads=1)


# ---------------------------------------------------------------------------------------------
# Schedule and corpus


def test_learning_rate_schedule():
    config = TrainConfig(out_dir="unused", steps=100, warmup_steps=10, peak_lr=1e-3, cooldown_lr=0.2,
                         weight_decay=0.1)
    schedule = [learning_rate(step, config) for step in range(100)]
    lrs = np.array([lr for lr, _ in schedule])
    decays = [wd for _, wd in schedule]
    # warm-up: linear up to the peak
    np.testing.assert_allclose(lrs[:10], 1e-3 * np.arange(1, 11) / 10, rtol=1e-12)
    assert lrs.max() == pytest.approx(1e-3, rel=1e-12)
    # stage 1: linear decay from the peak towards half of it at mid-training
    np.testing.assert_allclose(lrs[10:50], 1e-3 * (1 - 0.5 * np.arange(40) / 40), rtol=1e-12)
    assert np.all(np.diff(lrs[9:50]) <= 0) and 0.5e-3 < lrs[49] < 0.52e-3
    # stage 2 (cool-down): from cooldown_lr x peak, linearly to ~0, no weight decay
    np.testing.assert_allclose(lrs[50:], 0.2e-3 * (1 - np.arange(50) / 50), rtol=1e-12)
    assert np.all(np.diff(lrs[50:]) < 0) and 0 < lrs[-1] < 0.01 * 1e-3
    assert decays == [0.1] * 50 + [0.0] * 50

    odd = TrainConfig(out_dir="unused", steps=7, warmup_steps=2, peak_lr=2e-3)
    odd_lrs = [learning_rate(step, odd) for step in range(7)]
    assert [wd for _, wd in odd_lrs] == [0.1] * 3 + [0.0] * 4
    assert odd_lrs[1][0] == pytest.approx(2e-3) and all(lr > 0 for lr, _ in odd_lrs)


def test_held_out_rule_is_md5_mod_20():
    names = [f"pkg{i % 3}/mod_{i:02d}.py" for i in range(200)] + ["json/__init__.py", "a b/ü.py", "x"]
    for name in names:
        assert is_held_out(name) == (int.from_bytes(hashlib.md5(name.encode("utf-8")).digest(), "big") % 20 == 0)
    assert 0 < sum(map(is_held_out, names)) < len(names) // 5


def test_directory_and_single_file_corpus(tmp_path, corpus_dir):
    corpus = read_corpus(corpus_dir, "*.py")
    assert [n for n, _ in corpus.held_out] == ["pkg2/mod_14.py", "pkg2/mod_29.py", "pkg2/mod_38.py"]
    assert len(corpus.train) == 37 and all(n.endswith(".py") for n, _ in corpus.train)
    assert [n for n, _ in corpus.train] == sorted(n for n, _ in corpus.train)
    assert dict(corpus.train)["pkg0/mod_00.py"] == (corpus_dir / "pkg0" / "mod_00.py").read_text()

    single = tmp_path / "one.txt"
    lines = [f"line {i}\n" for i in range(2345)]
    single.write_text("".join(lines))
    split = read_corpus(single)
    pieces = dict(split.train + split.held_out)
    assert sorted(pieces) == sorted(f"one.txt:{i}" for i in range(0, 2345, 100))
    assert all(pieces[f"one.txt:{i}"] == "".join(lines[i : i + 100]) for i in range(0, 2345, 100))
    assert [n for n, _ in split.held_out] == [n for n in sorted(pieces) if is_held_out(n)]


def test_stdlib_corpus():
    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = read_corpus("stdlib")
    names = [n for n, _ in corpus.train + corpus.held_out]
    assert len(names) == len(set(names)) > 500
    for name in names:
        parts = name.split("/")
        assert name.endswith(".py") and not {"test", "idlelib", "site-packages"} & set(parts), name
    assert {"json/__init__.py", "email/parser.py", "os.py"} <= set(names)
    expected = set()  # walked here: every non-empty UTF-8 *.py outside test/, idlelib/, site-packages/
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in ("test", "idlelib", "site-packages")]
        for file in files:
            path = Path(directory) / file
            if file.endswith(".py") and path.is_file():
                try:
                    text = path.read_bytes().decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if text:
                    expected.add(path.relative_to(root).as_posix())
    assert set(names) == expected
    assert [n for n, _ in corpus.held_out] == sorted(
        n for n in names if int(hashlib.md5(n.encode()).hexdigest(), 16) % 20 == 0
    )
    assert 0.03 < len(corpus.held_out) / len(names) < 0.07
    texts = dict(corpus.train + corpus.held_out)
    assert texts["json/__init__.py"] == (root / "json" / "__init__.py").read_text(encoding="utf-8")
    assert corpus.held_out_bytes == sum(len(t.encode()) for _, t in corpus.held_out)


def test_cli_train_runs_the_same_loop_and_reports_errors_in_one_line(baseline, corpus_dir, tmp_path, capsys):
    from bitnet.cli import main

    config, _ = baseline
    out = tmp_path / "cli"
    flags = ["--corpus", str(corpus_dir), "--pattern", "*.py", "--vocab-size", "300", "--hidden-size", "256",
             "--intermediate-size", "256", "--num-layers", "1", "--context", "32", "--batch-size", "4",
             "--steps", str(STEPS), "--warmup-steps", "4", "--no-compile", "--checkpoint-every", "0", "--no-bf16",
             "--threads", "1", "--no-progress"]
    assert main(["train", "--out-dir", str(out), *flags]) == 0
    assert "held-out bits per byte" in capsys.readouterr().out
    assert losses_of(out) == losses_of(config.out_dir)  # the same run as train() with that config
    before = snapshot(out)
    assert main(["train", "--out-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "Traceback" not in err
    assert snapshot(out) == before

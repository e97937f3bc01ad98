"""Fuzzing the GGUF loader: a corrupt or truncated file raises ``bn.BitNetError``, nothing else.

A tiny model with a tokenizer is written once per module in each weight format. Each case
mutates its bytes in memory (random byte flips anywhere, flips in the header and metadata,
truncations at random lengths), writes them to one temporary file, and loads the model
(then runs it) and the tokenizer: each either works or raises ``bn.BitNetError``. Any
other exception, a crash or a case over the time limit fails, naming the seed to replay.

The default run has a few thousand cases; ``pytest -m slow`` runs many more.
"""

from __future__ import annotations

import signal

import numba
import numpy as np
import pytest
from test_gguf import _codes_with_scale_tensor, tiny_model, train_tokenizer, write_foreign_gguf

import bitnet as bn
from bitnet.choices import GGUF_WEIGHT_FORMATS
from bitnet.io.gguf import GGUFFile, save_gguf

SEED = 20261126
CASE_SECONDS = 20  # a case that takes longer counts as a hang
PROMPT = np.array([0, 1, 2])


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """``{format: (file bytes, header length)}`` of a tiny model and tokenizer."""
    tokenizer = train_tokenizer(vocab_size=280)
    model = tiny_model(vocab=tokenizer.get_vocab_size(), intermediate=256, layers=1, heads=2, kv_heads=1,
                       head_dtype="f16")
    folder = tmp_path_factory.mktemp("fuzz")
    files = {}
    for weight_format in GGUF_WEIGHT_FORMATS:
        path = folder / f"{weight_format}.gguf"
        save_gguf(model, path, weight_format, tokenizer=tokenizer)
        files[weight_format] = (path.read_bytes(), GGUFFile(path).data_offset)
    return files


@pytest.fixture(scope="module")
def single_thread():
    # Thousands of tiny loads need no parallel kernels, whose launches cost milliseconds
    # each on a busy two-core machine.
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(threads)


def mutate(data: bytes, header: int, rng: np.random.Generator) -> tuple[str, bytes]:
    """One corrupt copy of ``data``: ``(what was done, bytes)``."""
    kind = rng.integers(4)
    if kind == 3:
        # Truncations, half of them inside the header.
        length = int(rng.integers(0, header if rng.random() < 0.5 else len(data)))
        return f"truncate at {length}", data[:length]
    out = np.frombuffer(data, np.uint8).copy()
    # Flips anywhere (kind 0), or in the header and metadata (1), or a single bit there (2).
    end = len(data) if kind == 0 else header
    positions = rng.integers(0, end, int(rng.integers(1, 9)))
    if kind == 2:
        out[positions[0]] ^= np.uint8(1 << int(rng.integers(8)))
        positions = positions[:1]
    else:
        out[positions] ^= rng.integers(1, 256, len(positions)).astype(np.uint8)
    return f"flip bytes {sorted(positions.tolist())}", out.tobytes()


def _timeout(signum, frame):
    raise TimeoutError(f"a case ran over {CASE_SECONDS} s")


def load_everything(path) -> bool:
    """Describe the file (``bn.io.describe``), load the model, run it, and load the tokenizer; a
    BitNetError anywhere is a fine answer.

    Returns whether the model loaded.
    """
    try:
        bn.io.describe(path)
    except bn.BitNetError:
        pass
    try:
        model = bn.load_gguf(path)
        loaded = True
    except bn.BitNetError:
        loaded = False
    if loaded:
        try:
            model(PROMPT)
        except bn.BitNetError:
            pass
    try:
        tokenizer = bn.load_gguf_tokenizer(path)
        if tokenizer is not None:
            tokenizer.decode(tokenizer.encode("fuzz me 123").ids)
    except bn.BitNetError:
        pass
    return loaded


def run_cases(originals, tmp_path, cases: int, seed: int) -> int:
    """Run ``cases`` mutations per format; returns how many corrupt files still loaded."""
    loaded = 0
    target = tmp_path / "case.gguf"
    previous = signal.signal(signal.SIGALRM, _timeout)
    try:
        for weight_format, (data, header) in originals.items():
            rng = np.random.default_rng([seed, GGUF_WEIGHT_FORMATS.index(weight_format)])
            for case in range(cases):
                what, corrupt = mutate(data, header, rng)
                target.write_bytes(corrupt)
                signal.alarm(CASE_SECONDS)
                try:
                    loaded += load_everything(target)
                except Exception as exc:
                    raise AssertionError(
                        f"{weight_format} case {case} (seed {seed}: {what}) raised {type(exc).__name__}, "
                        f"not a bn.BitNetError: {exc}"
                    ) from exc
                finally:
                    signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return loaded


def test_originals_load(originals, tmp_path):
    for data, _ in originals.values():
        (tmp_path / "ok.gguf").write_bytes(data)
        assert np.isfinite(bn.load_gguf(tmp_path / "ok.gguf")(PROMPT)).all()
        assert bn.load_gguf_tokenizer(tmp_path / "ok.gguf") is not None


def test_fuzz_corrupt_and_truncated_files(originals, single_thread, tmp_path):
    cases = 700
    loaded = run_cases(originals, tmp_path, cases, seed=SEED)
    # Flips in weight payloads leave a loadable file; most header damage does not.
    assert 0 < loaded < len(originals) * cases / 2


@pytest.mark.slow
def test_fuzz_long(originals, single_thread, tmp_path):
    run_cases(originals, tmp_path, cases=17000, seed=SEED + 1)


SCALES = (0.05, 1.0, 1e-38, 65504.0, 0.0, -0.5, np.nan, np.inf, -np.inf, 1e38)


def test_fuzz_scale_tensors_and_layer_counts(tmp_path):
    """Files as llama.cpp lays out 2B4T weights (codes + ``blk.N.*.scale``), with random scales and block counts.

    The rule checked exactly: a file loads when its ``block_count`` matches its tensors and
    every scale lies in (0, 65504]; otherwise it raises ``bn.BitNetError``.
    """
    model = tiny_model(layers=2, heads=2, kv_heads=1, intermediate=256)
    rng = np.random.default_rng(SEED)
    loaded = 0
    for case in range(40):
        scales = []

        def projection(codes, scale, scales=scales):
            scales.append(SCALES[int(rng.integers(len(SCALES)))] if rng.random() < 0.1 else scale)
            return _codes_with_scale_tensor(codes, np.float32(scales[-1]))

        layers = int(rng.choice([0, 1, 2, 2, 2, 3, 2**31]))
        model.config.num_hidden_layers = layers  # what the metadata says; the tensors stay 2 layers
        try:
            write_foreign_gguf(tmp_path / "case.gguf", model, projection)
        finally:
            model.config.num_hidden_layers = 2
        valid = layers == 2 and all(0 < s <= 65504 for s in scales)
        try:
            logits = bn.load_gguf(tmp_path / "case.gguf")(PROMPT)
        except bn.BitNetError:
            assert not valid, f"case {case}: a valid file was refused (layers {layers}, scales {scales})"
            continue
        assert valid, f"case {case}: loaded with layers {layers}, scales {sorted(set(scales))}"
        assert np.isfinite(logits).all()
        loaded += 1
    assert 0 < loaded < 40

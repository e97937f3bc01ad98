"""Training text: the Python standard library's source (or the user's files), the held-out rule,
the byte-level BPE tokenizer, token streams, and bits per byte.

Nothing here needs torch: the shipped model's quality is measured with bitnet's own forward too.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import errors

STDLIB = "stdlib"
STDLIB_EXCLUDED = ("test", "idlelib", "site-packages")
HELD_OUT_MODULUS = 20
END_OF_TEXT = "<|endoftext|>"


def is_held_out(relative_path: str) -> bool:
    """The held-out rule: ``int(md5(relative_path)) % 20 == 0`` (path relative to the corpus root, with ``/``)."""
    return int(hashlib.md5(relative_path.encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


@dataclass
class Corpus:
    """The training and held-out texts of a corpus, each a list of ``(relative path, text)``, sorted by path."""

    train: list[tuple[str, str]]
    held_out: list[tuple[str, str]]

    @property
    def held_out_bytes(self) -> int:
        return sum(len(text.encode()) for _, text in self.held_out)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(source: str | Path, pattern: str) -> tuple[Path, list[Path]]:
    if str(source) == STDLIB:
        root = stdlib_root()
        files = [p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & set(STDLIB_EXCLUDED)]
        return root, files
    root = Path(source)
    if root.is_file():
        return root.parent, [root]
    if not root.is_dir():
        raise errors.InvalidValueError(f"corpus {source} is neither a file nor a directory (or 'stdlib')")
    return root, [p for p in root.rglob(pattern) if p.is_file()]


def read_corpus(source: str | Path = STDLIB, pattern: str = "*.txt") -> Corpus:
    """Read a corpus and split it by :func:`is_held_out` over the files' relative paths.

    Parameters
    ----------
    source : "stdlib" (every ``*.py`` of this Python's standard library, without ``test/``,
        ``idlelib/`` and ``site-packages/``), a directory (its files matching ``pattern``,
        recursively) or one text file (split by lines: every 20th line block of 100 is held out).
    pattern : glob of the files to read from a directory.

    Raises
    ------
    InvalidValueError when the corpus is missing or empty, holds a file that is not UTF-8
    text (binary data), or leaves nothing to train on or nothing held out.
    """
    root, files = _files(source, pattern)
    texts = []
    for file in sorted(files):
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            if str(source) == STDLIB:
                continue  # a few stdlib files are in other encodings: the rule is "UTF-8 files only"
            raise errors.InvalidValueError(f"{file} is not UTF-8 text: train on text files only") from None
        if "\0" in text:
            raise errors.InvalidValueError(f"{file} holds NUL bytes (binary data?): train on text files only")
        texts.append((file.relative_to(root).as_posix(), text))
    if len(texts) == 1:  # one file: split it into blocks of 100 lines named by their position
        lines = texts[0][1].splitlines(keepends=True)
        texts = [(f"{texts[0][0]}:{i}", "".join(lines[i : i + 100])) for i in range(0, len(lines), 100)]
    texts = [(name, text) for name, text in texts if text]
    train = [(n, t) for n, t in texts if not is_held_out(n)]
    held_out = [(n, t) for n, t in texts if is_held_out(n)]
    if not train or not held_out:
        raise errors.InvalidValueError(
            f"corpus {source} gives {len(train)} training and {len(held_out)} held-out pieces of text: it needs "
            f"both (more files or more lines of text)"
        )
    return Corpus(train, held_out)


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``; id 0 is ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def token_stream(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """``<|endoftext|>`` text ``<|endoftext|>`` text ... as one int64 array of token ids."""
    eos = tokenizer.token_to_id(END_OF_TEXT)
    pieces = [np.array([eos], np.int64)]
    for encoding in tokenizer.encode_batch(list(texts)):
        pieces += [np.asarray(encoding.ids, np.int64), np.array([eos], np.int64)]
    return np.concatenate(pieces)


def eval_windows(stream: np.ndarray, context: int) -> list[np.ndarray]:
    """Windows of ``context + 1`` tokens, overlapping by one, that predict every token after the first."""
    return [stream[start : start + context + 1] for start in range(0, len(stream) - 1, context)]


def bits_per_byte(nll_of_window: Callable[[np.ndarray], float], stream: np.ndarray, n_bytes: int,
                  context: int) -> float:
    """Held-out bits per byte: the summed negative log-likelihood (nats) of ``stream`` over its text's bytes.

    ``nll_of_window(ids)`` returns the summed NLL of ``ids[1:]`` given their prefixes in
    ``ids``. The end-of-text separators are predicted too, and cost bits without adding bytes.
    """
    total = sum(nll_of_window(window) for window in eval_windows(stream, context))
    return total / math.log(2) / n_bytes


def numpy_window_nll(model) -> Callable[[np.ndarray], float]:
    """``nll_of_window`` for a :class:`bitnet.BitNetForCausalLM` (bitnet's own forward)."""

    def nll(ids: np.ndarray) -> float:
        logits = model.forward(ids[:-1]).astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        return float((log_z - logits[np.arange(len(ids) - 1), ids[1:]]).sum())

    return nll

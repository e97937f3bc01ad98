"""The tokenizer of a model directory (``tokenizer.json``), through the ``tokenizers`` package."""

from __future__ import annotations

from pathlib import Path

from .. import errors
from ..models import bundled_path

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: str | Path | None = None):
    """The ``tokenizers.Tokenizer`` of model directory ``path``, or None when it has no ``tokenizer.json``.

    A ``.gguf`` file's tokenizer is read from its metadata (:func:`bitnet.load_gguf_tokenizer`);
    None gives the bundled model's tokenizer (:func:`bitnet.models.bundled_path`).

    Raises
    ------
    CheckpointError when ``tokenizer.json`` exists but cannot be read, or ``tokenizers`` is not installed.
    """
    path = bundled_path() if path is None else Path(path)
    if path.suffix.lower() == ".gguf":
        from .gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    file = Path(path) / TOKENIZER_FILE
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise errors.CheckpointError(
            'reading tokenizer.json needs the tokenizers package: pip install "bitnet-numba[hf]"'
        ) from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises untyped exceptions for bad files
        raise errors.CheckpointError(f"{file} is not a valid tokenizer file ({exc})") from None

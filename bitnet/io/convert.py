"""Convert a model between HF checkpoint directories and GGUF files, its tokenizer included.

The source is read by :func:`bitnet.load_pretrained` (a packed or float HF directory, float
projections quantized with absmean on the way, or a ``.gguf`` file) and written by
:func:`bitnet.save_pretrained` (format ``"hf"``) or :func:`bitnet.save_gguf` (``"tq2_0"``,
``"tq1_0"``, ``"i2_s"``), both of which write beside their targets and rename, so a failed
conversion leaves an existing destination as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import errors
from ..choices import CONVERT_FORMATS, HEADS
from . import atomic, gguf, hf, info, tokenizer

STAGES = ("read", "write", "tokenizer")


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_checkpoint` wrote.

    Attributes
    ----------
    destination : the directory (``"hf"``) or ``.gguf`` file written.
    format : the projections' format in it.
    tensors : how many tensors it holds.
    tokenizer : whether the source's tokenizer went with it.
    nbytes : its size on disk.
    seconds : wall time of the whole conversion.
    """

    destination: Path
    format: str
    tensors: int
    tokenizer: bool
    nbytes: int
    seconds: float


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    format: str,
    head: str = "auto",
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Conversion:
    """Convert the model at ``source`` into ``destination`` with projections in ``format``.

    Parameters
    ----------
    source : an HF model directory (packed or float projections) or a ``.gguf`` file.
    destination : the HF directory (``format="hf"``) or the ``.gguf`` file to write.
    format : "hf" (HF packed layout, 2 bits/weight), or a GGUF type: "tq2_0", "tq1_0", "i2_s".
    head : storage of the embedding / output head: "auto" (as in the source), "f32", "f16",
        "bf16" or "int8" (rounded to int8 per row; neither format has an int8 table type, so
        the rounded values are stored as float32).
    overwrite : replace an existing ``destination``; without it, an existing one is refused.
    progress : called as ``progress(stage, done, total)``: during "read" after each weight
        (``total`` weights), and with ``(stage, 0, 1)`` / ``(stage, 1, 1)`` around "write" and
        "tokenizer" (``STAGES``).

    Returns
    -------
    Conversion

    Raises
    ------
    InvalidValueError for an unknown ``format`` or ``head``; OutputExistsError when
    ``destination`` exists and ``overwrite`` is false, or is a file where a directory belongs
    (or the reverse), or is a sharded HF checkpoint (its index would shadow the new weights);
    the loaders' and savers' errors (CheckpointError, GGUFError, ...) for what the source
    holds or the format cannot hold, e.g. TQ types need ``in_features`` to be a multiple of 256.
    """
    start = time.perf_counter()
    format = errors.check_choice("target format", format, CONVERT_FORMATS)
    head = errors.check_choice("head dtype", head, HEADS)
    source, destination = Path(source), Path(destination)
    _check_destination(destination, format, overwrite)
    errors.check_callback(progress, "progress")
    report = progress or (lambda stage, done, total: None)
    model = hf.load_pretrained(source, head_dtype=head, progress=lambda done, total: report("read", done, total))
    vocabulary = tokenizer.load_tokenizer(source)
    report("write", 0, 1)
    if format == "hf":
        hf.save_pretrained(model, destination)
        report("write", 1, 1)
        report("tokenizer", 0, 1)
        _write_hf_extras(source, destination, vocabulary)
        report("tokenizer", 1, 1)
    else:
        gguf.save_gguf(model, destination, format, vocabulary)
        report("write", 1, 1)
    written = info.describe(destination)
    return Conversion(destination, format, written["tensors"]["count"], vocabulary is not None,
                      written["file_size"], time.perf_counter() - start)


def _check_destination(destination: Path, format: str, overwrite: bool) -> None:
    wants_directory = format == "hf"
    if destination.exists() and not overwrite:
        raise errors.OutputExistsError(f"{destination} exists: choose another path, or pass overwrite=True "
                                       f"(--overwrite) to replace it")
    if destination.exists() and destination.is_dir() != wants_directory:
        kind = "a directory" if destination.is_dir() else "a file"
        raise errors.OutputExistsError(f"{destination} is {kind}; format {format!r} writes "
                                       f"{'an HF model directory' if wants_directory else 'a .gguf file'}")
    if wants_directory and (destination / hf.INDEX_FILE).exists():
        # load_pretrained reads the index first, so it would keep loading the old shards.
        raise errors.OutputExistsError(f"{destination} holds a sharded checkpoint ({hf.INDEX_FILE}) that would "
                                       f"shadow the converted weights: remove it or choose another directory")


def _write_hf_extras(source: Path, destination: Path, vocabulary) -> None:
    """``tokenizer.json`` (and an HF source's ``generation_config.json``), each replaced atomically.

    A stale ``tokenizer.json`` left by an earlier checkpoint in ``destination`` would encode
    text with another vocabulary, so it is removed when the source has no tokenizer.
    """
    file = destination / tokenizer.TOKENIZER_FILE
    if vocabulary is None:
        file.unlink(missing_ok=True)
    else:
        with atomic.replacing(file) as (temporary,):
            vocabulary.save(str(temporary))
    if source.suffix.lower() != ".gguf" and source.resolve() != destination.resolve():
        sampling = hf.read_generation_config(source)
        if sampling:
            with atomic.replacing(destination / hf.GENERATION_CONFIG_FILE) as (temporary,):
                temporary.write_text(json.dumps(sampling, indent=2) + "\n")

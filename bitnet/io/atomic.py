"""Saving without destroying: write beside the target, flush to disk, then rename over it.

A save that fails half way (disk full, a refused tensor, Ctrl-C) must leave the file it
was replacing as it was, and no temporary behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(*targets: str | Path) -> Iterator[list[Path]]:
    """Temporary paths to write ``targets`` through, renamed over them only if the block succeeds.

    Each temporary lies in its target's directory (so the rename is atomic) under a hidden
    unique name. When the block ends normally, every temporary is fsynced, then renamed over
    its target in the order given (write a directory's index file, e.g. ``config.json``,
    last), and the directory is fsynced. When it raises, the temporaries are removed and the
    targets are untouched.

    Examples
    --------
    >>> with replacing("model.gguf") as (temporary,):   # doctest: +SKIP
    ...     write_everything(temporary)
    """
    paths = [Path(target) for target in targets]
    temporaries = [path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") for path in paths]
    try:
        yield temporaries
        for temporary in temporaries:
            _fsync(temporary, os.O_RDONLY)
        for temporary, path in zip(temporaries, paths, strict=True):
            os.replace(temporary, path)
    finally:
        for temporary in temporaries:  # each one renamed is gone already
            temporary.unlink(missing_ok=True)
    for directory in {path.parent for path in paths}:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory; the data is safe already
            _fsync(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

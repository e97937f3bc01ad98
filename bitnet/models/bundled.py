"""The small BitNet b1.58 model shipped inside the package (trained with ``bitnet.torch`` on Python's stdlib)."""

from __future__ import annotations

from pathlib import Path

from .. import errors

BUNDLED_DIR = Path(__file__).with_name("bundled")


def bundled_path() -> Path:
    """The HF-format directory of the bundled model (``config.json``, ``model.safetensors``, ``tokenizer.json``).

    Raises
    ------
    CheckpointNotFoundError when the package was installed without its data files.
    """
    if not (BUNDLED_DIR / "config.json").is_file():
        raise errors.CheckpointNotFoundError(
            f"the bundled model is missing from {BUNDLED_DIR}: reinstall the package with its data files"
        )
    return BUNDLED_DIR

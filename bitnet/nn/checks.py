"""The checks every public call of ``bitnet.nn`` makes before it hands arrays to a kernel.

The Numba kernels index without bounds checks (that is their speed), so a wrong width, a
token id past the table or a cache of another model would read or write outside an array.
Each layer checks its inputs once, here, and raises the library's errors instead.
"""

from __future__ import annotations

import math

import numpy as np

from .. import errors


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (Python or numpy), booleans excluded: ``True`` is no size or id."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    """Whether ``value`` is an integer or a float (Python or numpy), booleans excluded."""
    return is_int(value) or isinstance(value, (float, np.floating))


def check_rows(x: object, name: str, width: int) -> None:
    """Raise unless ``x`` is a float32 array ``(n, width)``: the activations every layer takes."""
    if not isinstance(x, np.ndarray):
        raise errors.DTypeError(f"{name} must be a numpy array, got {type(x).__name__}; pass np.asarray(...) of it")
    if x.dtype != np.float32:
        raise errors.DTypeError(f"{name} must have dtype float32, got {x.dtype}; convert it with .astype(np.float32)")
    if x.ndim != 2 or x.shape[1] != width:
        raise errors.ShapeError(f"{name} must have shape (tokens, {width}), got {x.shape}")


def checked_ids(ids: object, vocab_size: int, name: str = "token ids") -> np.ndarray:
    """``ids`` as a 1-D int64 array; raises unless every id lies in ``[0, vocab_size)``."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise errors.ShapeError(f"{name} must be a 1-D array of token ids, got shape {ids.shape}")
    if ids.size == 0:
        return ids.astype(np.int64)  # [] reads as float64: an empty list of ids is no wrong dtype
    if ids.dtype.kind not in "iu":
        raise errors.DTypeError(f"{name} must hold integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise errors.InvalidValueError(
            f"{name}: token ids must lie in [0, {vocab_size}) (the vocabulary size), got [{ids.min()}, {ids.max()}]"
        )
    return ids.astype(np.int64, copy=False)


def positive_int(value: object, name: str, error: type[errors.BitNetError] = errors.InvalidValueError) -> int:
    """``value`` as an int; ``error`` unless it is an integer >= 1 (booleans are not)."""
    if not is_int(value) or value < 1:
        raise error(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_number(value: object, name: str, error: type[errors.BitNetError] = errors.InvalidValueError) -> float:
    """``value`` as a float; ``error`` unless it is a finite number > 0 (booleans are not)."""
    if not is_real(value) or not (math.isfinite(value) and value > 0):
        raise error(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def float32_vector(value: object, name: str, size: int | None = None) -> None:
    """Raise unless ``value`` is a vector as the kernels take it: float32, 1-D, C-contiguous, not empty,
    and of ``size`` entries when given. For arrays a layer holds (a gain, a bias): a user may have
    assigned one since the layer converted it (:func:`float_vector`)."""
    if not (isinstance(value, np.ndarray) and value.dtype == np.float32 and value.ndim == 1
            and value.flags.c_contiguous):
        got = f"a {value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise errors.DTypeError(f"{name} must be a 1-D C-contiguous float32 array, got {got}: assign "
                                "np.ascontiguousarray(values, dtype=np.float32)")
    if value.size == 0 or (size is not None and value.shape[0] != size):
        raise errors.ShapeError(f"{name} must have {size or 'at least one'} entries, got {value.shape[0]}")


def float_vector(values: object, name: str) -> np.ndarray:
    """A non-empty 1-D float array as float32 (C-contiguous); raises for anything else."""
    if not isinstance(values, np.ndarray) or values.dtype.kind != "f":
        got = values.dtype if isinstance(values, np.ndarray) else type(values).__name__
        raise errors.DTypeError(f"{name} must be a floating-point numpy array, got {got}")
    if values.ndim != 1 or values.size == 0:
        raise errors.ShapeError(f"{name} must be a non-empty 1-D array, got shape {values.shape}")
    return np.ascontiguousarray(values, dtype=np.float32)

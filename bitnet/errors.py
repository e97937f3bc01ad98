"""Every error the library raises, and the checks that raise them.

All errors derive from :class:`BitNetError`, so ``except bn.BitNetError`` catches
anything this library raises on purpose. Each subclass also derives from the builtin
exception a numpy user would expect (``ValueError``, ``TypeError``, ...).

The ``check_*`` helpers keep the wording of common messages in this one file: each
message says what was wrong and what to do about it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np


class BitNetError(Exception):
    """Base class of every error raised by bitnet."""


class ShapeError(BitNetError, ValueError):
    """An array has the wrong rank or the wrong size along an axis."""


class DTypeError(BitNetError, TypeError):
    """An array has a dtype the operation does not accept."""


class InvalidValueError(BitNetError, ValueError):
    """An input holds values the operation cannot use (NaN, Inf, codes outside {-1, 0, 1}, ...)."""


class FormatError(BitNetError, ValueError):
    """An unknown packing format, a format that cannot hold a tensor, or corrupt packed data."""


class DeviceError(BitNetError, RuntimeError):
    """A compute device was asked for that is not available here."""


class CheckpointError(FormatError):
    """A checkpoint that cannot be loaded: corrupt or truncated file, tensor shapes disagreeing with the config."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A model directory or one of the files a checkpoint needs does not exist."""


class ConfigError(CheckpointError):
    """A model ``config.json`` this library cannot run (another ``model_type``, an unsupported option)."""


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read or written: corrupt, truncated, or holding a type or architecture we lack."""


class DependencyError(BitNetError, ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""


class OutputExistsError(BitNetError, FileExistsError):
    """A file or directory would be overwritten: choose another path, or say so (``overwrite``, ``resume``)."""


class ArenaError(BitNetError, RuntimeError):
    """Misuse of an arena: releasing a foreign buffer, releasing twice, ..."""


class ArenaLimitError(ArenaError, MemoryError):
    """An arena allocation would go over the limit set with ``Arena.set_limit``, or the memory the system gives."""


class OutOfMemoryError(BitNetError, MemoryError):
    """The system would not give the memory an object asked for: ask for less (a smaller capacity or length)."""


class ArenaDoubleReleaseError(ArenaError):
    """An arena array was released a second time (by hand, or by hand after its frame had ended)."""


class ArenaForeignArrayError(ArenaError):
    """An array given to an arena method was not handed out by that arena (or is only a view of one)."""


class ContextLengthError(InvalidValueError):
    """A request whose prompt plus the tokens it asks for does not fit the context a server allows."""


class OverloadedError(BitNetError, RuntimeError):
    """A server cannot take a request now: its queue is full, or it is shutting down. Retry later."""


class UnknownModelError(BitNetError, LookupError):
    """A request names a model the server does not serve."""


def check_array(a: object, name: str) -> None:
    """Raise DTypeError unless ``a`` is a numpy array (None, lists and scalars are refused, not guessed at)."""
    if not isinstance(a, np.ndarray):
        raise DTypeError(f"{name} must be a numpy array, got {type(a).__name__}; pass np.asarray(...) of it")


def check_ndim(a: np.ndarray, name: str, allowed: Iterable[int]) -> None:
    """Raise ShapeError unless ``a.ndim`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if a.ndim not in allowed:
        ranks = " or ".join(f"{r}-D" for r in allowed)
        raise ShapeError(f"{name} must be {ranks}, got a {a.ndim}-D array of shape {a.shape}; reshape it first")


def check_dtype(a: np.ndarray, name: str, allowed: Iterable[type | np.dtype | str]) -> None:
    """Raise DTypeError unless ``a.dtype`` is one of ``allowed``."""
    allowed = tuple(np.dtype(d) for d in allowed)
    if a.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise DTypeError(f"{name} must have dtype {names}; got {a.dtype}. Convert it with .astype(...)")


def token_rows(a: np.ndarray, name: str, k: int) -> np.ndarray:
    """``a`` of shape ``(k,)`` or ``(..., k)`` as an ``(n, k)`` view (leading axes are tokens).

    Raises ShapeError for a scalar or a last axis that is not ``k``.
    """
    if a.ndim == 0:
        raise ShapeError(f"{name} must have at least 1 dimension (k,) or (n, k), got a scalar")
    if a.shape[-1] != k:
        raise ShapeError(f"{name} have {a.shape[-1]} features (last axis of shape {a.shape}), the weights take {k}")
    return a.reshape(-1, k)


def checked_out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """``out``, checked to be a writeable C-contiguous float32 array of ``shape`` a kernel fills; None: a new one."""
    if out is None:
        return np.empty(shape, np.float32)
    if not isinstance(out, np.ndarray):
        raise DTypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype != np.float32:  # compared first: building check_dtype's message costs ~1 us a call
        check_dtype(out, "out", [np.float32])
    if out.shape != shape:
        raise ShapeError(f"out must have shape {shape}, got {out.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ShapeError("out must be a writeable, C-contiguous array")
    return out


def check_callback(callback: object, name: str) -> None:
    """Raise InvalidValueError unless ``callback`` is None or callable."""
    if callback is not None and not callable(callback):
        raise InvalidValueError(f"{name} must be callable, got {callback!r:.80}")


def check_float(a: np.ndarray, name: str) -> None:
    """Raise DTypeError unless ``a`` holds real floating-point numbers."""
    if a.dtype.kind != "f":
        raise DTypeError(
            f"{name} must be a floating-point array (float16/32/64), got dtype {a.dtype}; "
            f"convert it with .astype(np.float32)"
        )


def check_finite(a: np.ndarray, name: str) -> None:
    """Raise InvalidValueError if ``a`` holds NaN or Inf."""
    if not np.isfinite(a).all():
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise InvalidValueError(
            f"{name} holds {bad} NaN or Inf value(s); ternary quantization needs finite numbers. "
            f"Clean them first, e.g. np.nan_to_num(...)"
        )


def check_ternary_codes(codes: np.ndarray, name: str = "codes") -> None:
    """Raise InvalidValueError unless every code is -1, 0 or +1."""
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise InvalidValueError(
            f"{name} must hold only -1, 0 and +1; found values in [{codes.min()}, {codes.max()}]. "
            f"Quantize with bn.quantize_weights(...) to get ternary codes"
        )


def check_choice(kind: str, got: object, known: Iterable[object], error: type[BitNetError] = InvalidValueError):
    """``got`` if it is one of ``known``, else the ``unknown_name`` error.

    Arrays, lists and other unhashable values are refused here rather than compared
    (``array in ("a", "b")`` would raise numpy's ambiguous-truth ValueError).
    """
    known = tuple(known)
    if isinstance(got, Hashable) and not isinstance(got, np.ndarray) and got in known:
        return got
    raise unknown_name(kind, got, known, error)


def unknown_name(kind: str, got: object, known: Iterable[str], error: type[BitNetError] = InvalidValueError):
    """The error for a name (format, method, granularity, ...) that is not one of ``known``."""
    return error(f"unknown {kind} {got!r}; choose one of: {', '.join(sorted(map(str, known)))}")

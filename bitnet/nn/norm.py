"""RMSNorm, computed in float32 as HF's ``BitNetRMSNorm``: ``w * (x / sqrt(mean(x^2) + eps))``."""

from __future__ import annotations

import numpy as np

from .. import errors
from ..kernels import rows
from . import checks, scratch
from .changes import Tracked


class RMSNorm(Tracked):
    """Root-mean-square normalization over the last axis, with a learned per-feature gain.

    Parameters
    ----------
    weight : array_like of float, shape ``(features,)``; kept as float32.
    eps : the epsilon added to the mean square (``rms_norm_eps`` of the config).
    tag : role of the output buffer shared across layers (see ``bitnet.nn.scratch.reused``).
    """

    def __init__(self, weight: np.ndarray, eps: float = 1e-5, tag: str | None = None) -> None:
        self.weight = checks.float_vector(weight, "RMSNorm weight")
        self.eps = eps
        self.tag = tag

    @property
    def eps(self) -> np.float32:
        """The epsilon added to the mean square: any positive number assigned is kept as float32, the
        type the kernels take (a Python float would make Numba compile them again for float64)."""
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = np.float32(checks.positive_number(value, "RMSNorm eps"))

    def check(self, features: int | None = None, name: str = "RMSNorm") -> None:
        """Raise unless this norm can run (over ``features`` features, when given): its gain a float32
        vector. The kernels do not check it, and it may have been assigned since construction;
        ``name`` says which norm this is in messages."""
        checks.float32_vector(self.weight, f"the weight of {name}", features)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Normalize the rows of ``x`` (``(n, features)`` float32) into a new step temporary."""
        self.check()
        checks.check_rows(x, "RMSNorm input", self.weight.shape[0])
        return self._forward(x)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """``self(x)`` for an ``x`` the caller has checked (see ``BitLinear._forward``)."""
        out = scratch.reused(self.tag, x.shape)
        rows.for_rows(x.shape[0]).rms_norm(x, self.weight, self.eps, out)
        return out

    def add_and_normalize(self, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """``x += delta`` in place (a residual update), then return ``self(x)``, in one pass."""
        self.check()
        checks.check_rows(x, "RMSNorm input", self.weight.shape[0])
        checks.check_rows(delta, "residual update", self.weight.shape[0])
        if delta.shape != x.shape or not x.flags.writeable:
            raise errors.ShapeError(f"the residual update {delta.shape} must match the writeable input {x.shape}")
        return self._add_and_normalize(x, delta)

    def _add_and_normalize(self, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """``add_and_normalize`` for arguments the caller has checked."""
        out = scratch.reused(self.tag, x.shape)
        rows.for_rows(x.shape[0]).add_rms_norm(x, delta, self.weight, self.eps, out)
        return out


def check_norm(norm: object, features: int, name: str, optional: bool = False) -> None:
    """Raise unless ``norm`` is an :class:`RMSNorm` that can run over ``features`` features (or None,
    where ``optional``); ``name`` says which norm this is, for the messages."""
    if norm is None and optional:
        return
    if not isinstance(norm, RMSNorm):
        raise errors.DTypeError(f"{name} must be an RMSNorm{' or None' if optional else ''}, got {type(norm).__name__}")
    norm.check(features, name)

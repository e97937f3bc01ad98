"""RMSNorm, computed in float32 as HF's ``BitNetRMSNorm``: ``w * x / sqrt(mean(x^2) + eps)``."""

from __future__ import annotations

import numpy as np

from . import scratch


class RMSNorm:
    """Root-mean-square normalization over the last axis, with a learned per-feature gain.

    Parameters
    ----------
    weight : array_like of float, shape ``(features,)``; kept as float32.
    eps : the epsilon added to the mean square (``rms_norm_eps`` of the config).
    """

    def __init__(self, weight: np.ndarray, eps: float = 1e-5) -> None:
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.eps = np.float32(eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Normalize the rows of ``x`` (``(n, features)`` float32); returns a new step temporary."""
        mean_square = np.einsum("ij,ij->i", x, x)[:, None]
        mean_square /= np.float32(x.shape[-1])
        out = scratch.empty(x.shape)
        np.multiply(x, 1.0 / np.sqrt(mean_square + self.eps), out=out)
        out *= self.weight
        return out

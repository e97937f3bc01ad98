"""Quality of a quantized tensor against the float tensor it came from.

Each function takes the float weights ``w`` and anything with a ``dequantize()`` method
(TernaryTensor, QuantizedTensor) or a float array of the same shape, and compares in float64.
"""

from __future__ import annotations

import numpy as np

from . import errors
from .formats import PackedTernary, unpack


def _pair(w, t) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(t, PackedTernary):
        t = unpack(t)
    approx = t.dequantize() if hasattr(t, "dequantize") else np.asarray(t)
    w = np.asarray(w, np.float64)
    if w.shape != approx.shape:
        raise errors.ShapeError(f"cannot compare weights of shape {w.shape} with a tensor of shape {approx.shape}")
    return w, approx.astype(np.float64)


def mse(w, t) -> float:
    """Mean squared error ``mean((w - t)**2)``."""
    w, approx = _pair(w, t)
    return float(np.mean((w - approx) ** 2))


def sqnr(w, t) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum w**2 / sum (w - t)**2)`` (inf if exact)."""
    w, approx = _pair(w, t)
    noise = np.sum((w - approx) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(w**2) / noise))


def cosine(w, t) -> float:
    """Cosine similarity of the flattened tensors (1.0 when both are zero)."""
    w, approx = _pair(w, t)
    norms = np.linalg.norm(w) * np.linalg.norm(approx)
    return 1.0 if norms == 0 else float(np.dot(w.ravel(), approx.ravel()) / norms)

"""Ternary matmul: validate inputs once, quantize activations, run the integer kernel, scale."""

from __future__ import annotations

import numpy as np

from . import backends, errors
from .formats import PackedTernary, unpack
from .quant import quantize_activations


def _codes(w: PackedTernary) -> np.ndarray:
    if "codes" not in w.cache:
        w.cache["codes"] = unpack(w).codes
    return w.cache["codes"]


def matmul_int(q: np.ndarray, w: PackedTernary) -> np.ndarray:
    """Exact int32 accumulators ``q @ codes.T`` of int8 activations ``q`` (``(k,)`` or ``(n, k)``)."""
    q = np.asarray(q)
    errors.check_dtype(q, "activations", [np.int8])
    if q.shape[-1] != w.shape[1]:
        raise errors.ShapeError(f"activations have {q.shape[-1]} features, the weights take {w.shape[1]}")
    return (q.astype(np.int32) @ _codes(w).T.astype(np.int32)).astype(np.int32)


def matmul(x: np.ndarray, w: PackedTernary, out: np.ndarray | None = None, device: str = "cpu") -> np.ndarray:
    """``x @ W.T`` with int8 per-row activations and ternary weights: ``acc / a * s`` in float32."""
    if device != backends.CPU:
        return backends.get_backend(device).matmul(x, w, out=out)
    q, a = quantize_activations(x)
    if w.granularity != "tensor" and w.granularity != "channel":
        raise errors.FormatError("matmul needs a per-tensor or per-channel weight scale")
    scale = w.scale.reshape(-1) if w.granularity == "channel" else w.scale
    return (matmul_int(q, w) / a * scale).astype(np.float32)

"""Rotary position embedding: HF's "default" rope, its "linear" and "llama3" frequency scalings,
and llama.cpp's per-frequency divisors (a GGUF ``rope_freqs`` tensor)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import errors
from . import checks

INITIAL_POSITIONS = 256


class RotaryEmbedding:
    """Cos/sin tables for rotating query and key heads by their position.

    ``inv_freq[i] = 1 / theta ** (2 i / head_dim)``; position ``p`` rotates the pair
    ``(x[i], x[i + head_dim / 2])`` by ``p * inv_freq[i]`` (the "rotate half" layout of HF,
    not interleaved pairs). The tables are float32 ``(positions, head_dim)`` with the
    frequencies repeated twice, computed like transformers does, and grow by doubling.

    Parameters
    ----------
    head_dim : even number of features per head.
    theta : the rope base (``rope_theta``; 500000 for BitNet b1.58 2B4T).
    scaling : HF's rope parameters for a scaled rope (``{"rope_type": "linear", "factor": f}`` or
        Llama 3's ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings"}``), llama.cpp's ``{"rope_type": "freq_factors",
        "freq_factors": [...]}`` (``inv_freq[i] / freq_factors[i]``), or None.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        head_dim = checks.positive_int(head_dim, "head_dim")
        if head_dim % 2:
            raise errors.ShapeError(f"rotary embedding needs an even head_dim, got {head_dim}")
        theta = checks.positive_number(theta, "the rope base theta")
        self.head_dim = head_dim
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        self.inv_freq = scaled_frequencies((1.0 / (np.float32(theta) ** exponents)).astype(np.float32), scaling)
        self._build(INITIAL_POSITIONS)

    def _build(self, positions: int) -> None:
        freqs = np.arange(positions, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        angles = np.concatenate([freqs, freqs], axis=1)
        self.cos = np.cos(angles).astype(np.float32)
        self.sin = np.sin(angles).astype(np.float32)

    def reserve(self, positions: int) -> None:
        """Make the tables cover positions ``0 .. positions - 1``, doubling as needed."""
        if positions > self.cos.shape[0]:
            size = self.cos.shape[0]
            while size < positions:
                size *= 2
            self._build(size)

    def apply(self, x: np.ndarray, start: int) -> None:
        """Rotate ``x`` of shape ``(n, heads, head_dim)`` in place, row ``i`` being position ``start + i``."""
        n = x.shape[0]
        self.reserve(start + n)
        cos = self.cos[start : start + n, None, :]
        sin = self.sin[start : start + n, None, :]
        half = self.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        x[...] = x * cos + rotated * sin


def scaled_frequencies(inv_freq: np.ndarray, scaling: dict[str, Any] | None) -> np.ndarray:
    """``inv_freq`` under a rope scaling (float32, transformers' order of operations for HF's types)."""
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "freq_factors":
        return (inv_freq / checked_freq_factors(scaling.get("freq_factors"), len(inv_freq))).astype(np.float32)
    try:
        factor = np.float32(scaling["factor"])
        if kind == "linear":
            return (inv_freq / factor).astype(np.float32)
        low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
        old_context = np.float32(scaling["original_max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.ConfigError(f"rope scaling {scaling} lacks a numeric parameter ({exc!r})") from None
    if kind != "llama3":
        raise errors.ConfigError(
            f"unsupported rope type {kind!r}: default, linear, llama3 and freq_factors are implemented"
        )
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (np.float32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def llama3_freq_factors(head_dim: int, theta: float, scaling: dict[str, Any]) -> np.ndarray:
    """Llama 3 scaling as llama.cpp's per-frequency divisors (its converter's ``rope_freqs``, float32).

    The divisor is 1 for short wavelengths, ``factor`` for long ones and
    ``1 / ((1 - smooth) / factor + smooth)`` in between: the same frequencies as HF's
    "llama3" rope to float32 rounding.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    return (inv_freq / scaled_frequencies(inv_freq, scaling)).astype(np.float32)


def checked_freq_factors(factors: Any, count: int) -> np.ndarray:
    """``factors`` as ``count`` float32 divisors; ConfigError unless each is finite and positive."""
    try:
        values = np.asarray(factors, dtype=np.float32)
    except (TypeError, ValueError):
        values = np.zeros(0, np.float32)
    if values.shape != (count,) or not np.all(np.isfinite(values) & (values > 0)):
        raise errors.ConfigError(
            f"rope freq_factors must be {count} finite positive numbers (one per frequency of the head), got "
            f"{str(factors)[:80]}"
        )
    return values

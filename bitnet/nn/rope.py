"""Rotary position embedding, HF's "default" rope type (no scaling)."""

from __future__ import annotations

import numpy as np

from .. import errors

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
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        if head_dim % 2:
            raise errors.ShapeError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        self.inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
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

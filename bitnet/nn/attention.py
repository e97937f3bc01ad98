"""Grouped-query attention with a preallocated key/value cache."""

from __future__ import annotations

import numpy as np

from .. import errors
from . import scratch
from .linear import BitLinear
from .norm import RMSNorm
from .rope import RotaryEmbedding

INITIAL_CACHE_LENGTH = 256


class KVCache:
    """Keys and values of every layer for one sequence, preallocated up to ``capacity`` positions.

    ``keys[layer]`` and ``values[layer]`` have shape ``(kv_heads, capacity, head_dim)``;
    positions ``0 .. length - 1`` are filled. Appending past the capacity doubles it (one
    copy), so a decode step normally writes into memory that already exists.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int = INITIAL_CACHE_LENGTH) -> None:
        shape = (kv_heads, max(int(capacity), 1), head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions in total, doubling the capacity as needed."""
        if length <= self.capacity:
            return
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = np.zeros((old.shape[0], capacity, old.shape[2]), np.float32)
                grown[:, : self.length] = old[:, : self.length]
                store[i] = grown


class Attention:
    """BitNet self-attention: q/k/v projections, rope, causal GQA, ``attn_sub_norm``, o projection.

    Query head ``h`` attends with key/value head ``h // (heads // kv_heads)``, as HF's
    ``repeat_kv`` pairs them.

    Parameters
    ----------
    q_proj, k_proj, v_proj, o_proj : BitLinear projections.
    sub_norm : RMSNorm over ``heads * head_dim`` applied before ``o_proj``.
    heads, kv_heads, head_dim : the head layout; ``heads`` must be a multiple of ``kv_heads``.
    rope : the rotary embedding shared by all layers.
    """

    def __init__(
        self,
        q_proj: BitLinear,
        k_proj: BitLinear,
        v_proj: BitLinear,
        o_proj: BitLinear,
        sub_norm: RMSNorm,
        heads: int,
        kv_heads: int,
        head_dim: int,
        rope: RotaryEmbedding,
    ) -> None:
        if heads % kv_heads:
            raise errors.ShapeError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.projections = (q_proj, k_proj, v_proj)
        self.o_proj = o_proj
        self.sub_norm = sub_norm
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rope = rope
        self.scaling = np.float32(head_dim**-0.5)
        try:
            self.qkv_proj = BitLinear.stacked(list(self.projections))
        except errors.InvalidValueError:
            self.qkv_proj = None

    def _project(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queries ``(n, heads, d)``, keys and values ``(n, kv_heads, d)``."""
        n, d = x.shape[0], self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
            q_end, k_end = self.heads * d, (self.heads + self.kv_heads) * d
            q, k, v = qkv[:, :q_end], qkv[:, q_end:k_end], qkv[:, k_end:]
        else:
            q, k, v = (proj(x) for proj in self.projections)
        return q.reshape(n, self.heads, d), k.reshape(n, self.kv_heads, d), v.reshape(n, self.kv_heads, d)

    def __call__(self, x: np.ndarray, cache: KVCache, layer: int) -> np.ndarray:
        """Attend ``x`` (``(n, hidden)``, positions ``cache.length ..``) to itself and the cache.

        Writes this layer's keys and values into the cache; the caller advances
        ``cache.length`` once all layers have run.
        """
        n, start = x.shape[0], cache.length
        q, k, v = self._project(x)
        self.rope.apply(q, start)
        self.rope.apply(k, start)
        end = start + n
        keys, values = cache.keys[layer], cache.values[layer]
        keys[:, start:end] = k.transpose(1, 0, 2)
        values[:, start:end] = v.transpose(1, 0, 2)
        context = self._attend(q, keys[:, :end], values[:, :end], start)
        return self.o_proj(self.sub_norm(context))

    def _attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
        """Causal softmax attention of ``q`` (``(n, heads, d)``) over ``keys``/``values`` ``(kv_heads, T, d)``."""
        n, d, group = q.shape[0], self.head_dim, self.heads // self.kv_heads
        # Rows of each kv head's block are (query head in its group, token): one batched matmul.
        grouped = q.reshape(n, self.kv_heads, group, d).transpose(1, 2, 0, 3).reshape(self.kv_heads, group * n, d)
        scores = np.matmul(grouped, keys.transpose(0, 2, 1))
        scores *= self.scaling
        if n > 1:
            query_pos = start + np.arange(n)
            future = np.arange(keys.shape[1])[None, :] > query_pos[:, None]
            scores.reshape(self.kv_heads, group, n, -1)[:, :, future] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        context = np.matmul(scores, values)
        out = scratch.empty((n, self.heads * d))
        out.reshape(n, self.kv_heads, group, d)[...] = context.reshape(self.kv_heads, group, n, d).transpose(2, 0, 1, 3)
        return out

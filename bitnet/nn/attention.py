"""Grouped-query attention with a preallocated key/value cache."""

from __future__ import annotations

import numpy as np

from .. import errors
from . import float_kernels, scratch
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
    """Self-attention: q/k/v projections, rope, causal GQA, BitNet's ``attn_sub_norm`` (if any), o projection.

    Query head ``h`` attends with key/value head ``h // (heads // kv_heads)``, as HF's
    ``repeat_kv`` pairs them.

    Parameters
    ----------
    q_proj, k_proj, v_proj, o_proj : BitLinear projections.
    sub_norm : RMSNorm over ``heads * head_dim`` applied before ``o_proj``, or None (Llama-architecture ternary).
    heads, kv_heads, head_dim : the head layout; ``heads`` must be a multiple of ``kv_heads``.
    rope : the rotary embedding shared by all layers.
    """

    def __init__(
        self,
        q_proj: BitLinear,
        k_proj: BitLinear,
        v_proj: BitLinear,
        o_proj: BitLinear,
        sub_norm: RMSNorm | None,
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
            self.qkv_proj.tag = "self_attn.qkv_proj"
        except errors.InvalidValueError:
            self.qkv_proj = None
        for name, proj in zip(("q_proj", "k_proj", "v_proj", "o_proj"), (*self.projections, o_proj), strict=True):
            proj.tag = f"self_attn.{name}"

    @property
    def running_linears(self) -> tuple[BitLinear, ...]:
        """The projections the forward pass calls: the stacked q/k/v one in place of its parts."""
        qkv = (self.qkv_proj,) if self.qkv_proj is not None else self.projections
        return (*qkv, self.o_proj)

    def _project(self, x: np.ndarray) -> np.ndarray:
        """Queries, keys and values side by side: ``(n, (heads + 2 kv_heads) head_dim)``."""
        if self.qkv_proj is not None:
            return self.qkv_proj(x)
        parts = [proj(x) for proj in self.projections]
        qkv = scratch.reused("self_attn.qkv", (x.shape[0], sum(p.shape[1] for p in parts)))
        np.concatenate(parts, axis=1, out=qkv)
        return qkv

    def __call__(self, x: np.ndarray, cache: KVCache, layer: int) -> np.ndarray:
        """Attend ``x`` (``(n, hidden)``, positions ``cache.length ..``) to itself and the cache.

        Writes this layer's keys and values into the cache; the caller advances
        ``cache.length`` once all layers have run.
        """
        n, start = x.shape[0], cache.length
        qkv = self._project(x)
        self.rope.reserve(start + n)
        queries = scratch.reused("self_attn.queries", (n, self.heads, self.head_dim))
        keys, values = cache.keys[layer], cache.values[layer]
        float_kernels.rope_into_cache(qkv, self.heads, self.kv_heads, self.rope.cos, self.rope.sin, start,
                                      queries, keys, values)
        context = self._attend(queries, keys, values, start)
        return self.o_proj(context if self.sub_norm is None else self.sub_norm(context))

    def _attend(self, queries: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
        """Causal attention of ``queries`` (``(n, heads, d)``, from position ``start``) over the cache.

        ``keys``/``values`` are ``(kv_heads, capacity, d)`` with positions ``0 .. start + n - 1`` filled.
        """
        n = queries.shape[0]
        # Sized by the cache capacity, not the current length, so decode steps reuse one buffer.
        scores = scratch.reused("self_attn.scores", (self.heads, keys.shape[1]))
        context = scratch.reused("self_attn.context", (n, self.heads * self.head_dim))
        kernels = float_kernels.for_attention(n, start + n)
        kernels.causal_attention(queries, keys, values, start, self.scaling, scores, context)
        return context

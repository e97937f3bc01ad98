"""Grouped-query attention with a preallocated key/value cache."""

from __future__ import annotations

import numpy as np

from .. import errors
from . import checks, float_kernels, scratch
from .linear import BitLinear
from .norm import RMSNorm
from .rope import RotaryEmbedding

INITIAL_CACHE_LENGTH = 256


class KVCache:
    """Keys and values of every layer for one sequence, preallocated up to ``capacity`` positions.

    ``keys[layer]`` and ``values[layer]`` have shape ``(kv_heads, capacity, head_dim)``;
    positions ``0 .. length - 1`` are filled. Appending past the capacity doubles it (one
    copy), so a decode step normally writes into memory that already exists. With
    ``max_length`` (the model's context) the capacity never grows past it, and reserving
    more positions raises InvalidValueError.
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, capacity: int = INITIAL_CACHE_LENGTH,
        max_length: int | None = None,
    ) -> None:
        sizes = [checks.positive_int(v, name) for v, name in ((layers, "layers"), (kv_heads, "kv_heads"),
                                                             (head_dim, "head_dim"), (capacity, "capacity"))]
        self.max_length = None if max_length is None else checks.positive_int(max_length, "max_length")
        capacity = sizes[3] if self.max_length is None else min(sizes[3], self.max_length)
        shape = (sizes[1], capacity, sizes[2])
        self.keys = [np.zeros(shape, np.float32) for _ in range(sizes[0])]
        self.values = [np.zeros(shape, np.float32) for _ in range(sizes[0])]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions in total, doubling the capacity as needed (up to ``max_length``)."""
        if length <= self.capacity:
            return
        if self.max_length is not None and length > self.max_length:
            raise errors.InvalidValueError(
                f"the cache holds at most {self.max_length} positions (the model's context), {length} were asked for"
            )
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        if self.max_length is not None:
            capacity = min(capacity, self.max_length)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = np.zeros((old.shape[0], capacity, old.shape[2]), np.float32)
                grown[:, : self.length] = old[:, : self.length]
                store[i] = grown

    def check(self, layers: int, kv_heads: int, head_dim: int) -> None:
        """Raise unless this cache has ``layers`` layers of ``(kv_heads, capacity, head_dim)`` float32
        keys and values and a length within its capacity: the layout a model's kernels write into."""
        if len(self.keys) != layers or len(self.values) != layers:
            raise errors.ShapeError(
                f"this KV cache has {len(self.keys)} layers, the model {layers}: make it with the model's new_cache()"
            )
        for index in range(layers):
            self.layer(index, kv_heads, head_dim, 0)

    def layer(self, index: int, kv_heads: int, head_dim: int, new: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of layer ``index``, checked to have room for ``new`` positions after ``length``.

        Raises ShapeError when the layer is missing or its arrays are not float32
        ``(kv_heads, capacity, head_dim)`` (a cache made for another model), or when the
        positions do not fit (call :meth:`reserve` first).
        """
        if not 0 <= index < len(self.keys) or len(self.values) != len(self.keys):
            raise errors.ShapeError(f"this KV cache has no layer {index}: make it with the model's new_cache()")
        keys, values = self.keys[index], self.values[index]
        expected = (kv_heads, self.capacity, head_dim)
        for name, array in (("keys", keys), ("values", values)):
            if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.shape != expected:
                got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
                raise errors.ShapeError(
                    f"KV cache {name} of layer {index} are {got}, the model needs float32 (kv_heads={kv_heads}, "
                    f"{self.capacity}, head_dim={head_dim}): make the cache with the model's new_cache()"
                )
        length = self.length
        if not isinstance(length, (int, np.integer)) or not 0 <= length <= self.capacity - new:
            raise errors.ShapeError(
                f"the cache length {length!r} plus {new} new positions must fit its capacity {self.capacity}: "
                f"call cache.reserve(length + new) first"
            )
        return keys, values


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
        heads, kv_heads, head_dim = (checks.positive_int(v, name) for v, name in
                                     ((heads, "heads"), (kv_heads, "kv_heads"), (head_dim, "head_dim")))
        if heads % kv_heads:
            raise errors.ShapeError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        if not all(isinstance(p, BitLinear) for p in (q_proj, k_proj, v_proj, o_proj)):
            raise errors.DTypeError("the q, k, v and o projections must be BitLinear layers")
        hidden, q, kv = q_proj.in_features, heads * head_dim, kv_heads * head_dim
        expected = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q)}
        for (name, shape), proj in zip(expected.items(), (q_proj, k_proj, v_proj, o_proj), strict=True):
            if (proj.out_features, proj.in_features) != shape:
                raise errors.ShapeError(
                    f"{name} is {proj.out_features}x{proj.in_features}, {heads} heads ({kv_heads} key/value) of "
                    f"{head_dim} over {hidden} features need {shape[0]}x{shape[1]}"
                )
        if sub_norm is not None and (not isinstance(sub_norm, RMSNorm) or sub_norm.weight.shape != (q,)):
            raise errors.ShapeError(f"the attention sub-norm must be an RMSNorm over {q} features")
        if not isinstance(rope, RotaryEmbedding) or rope.head_dim != head_dim:
            raise errors.ShapeError(f"the rotary embedding must be one of head_dim {head_dim}")
        self.hidden_size = hidden
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
        checks.check_rows(x, "attention input", self.hidden_size)
        if not isinstance(cache, KVCache):
            raise errors.DTypeError(f"cache must be a bn.nn.KVCache, got {type(cache).__name__}")
        n, start = x.shape[0], cache.length
        keys, values = cache.layer(layer, self.kv_heads, self.head_dim, n)
        qkv = self._project(x)
        self.rope.reserve(start + n)
        queries = scratch.reused("self_attn.queries", (n, self.heads, self.head_dim))
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

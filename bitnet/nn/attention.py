"""Grouped-query attention with a preallocated key/value cache."""

from __future__ import annotations

import numpy as np

from .. import choices, errors
from ..kernels import attention as kernels
from ..memory import Arena
from ..ops import KERNEL_PATH
from . import checks, scratch
from .changes import Tracked
from .linear import BitLinear, check_projection
from .norm import RMSNorm, check_norm
from .rope import RotaryEmbedding

INITIAL_CACHE_LENGTH = 256


CACHE_DTYPES = {name: np.dtype(name).type for name in choices.CACHE_DTYPES}
"""Storage a KV cache may use: float32 (HF transformers' numbers) or float16 (llama.cpp's
default: half the bytes a long context reads per token)."""


class KVCache:
    """Keys and values of every layer for one sequence, preallocated up to ``capacity`` positions.

    ``keys[layer]`` and ``values[layer]`` (tuples of arrays, one per layer) have shape
    ``(kv_heads, capacity, head_dim)``; positions ``0 .. length - 1`` are filled. Appending
    past the capacity doubles it (one copy), so a decode step normally writes into memory
    that already exists. With ``max_length`` (the model's context) the capacity never grows
    past it, and reserving more positions raises InvalidValueError.

    Parameters
    ----------
    layers, kv_heads, head_dim : the model's cache layout.
    capacity : positions to allocate at first.
    max_length : the most positions the cache may ever hold, or None.
    dtype : "float32", or "float16": keys and values rounded to the nearest f16 as they are
        written and widened exactly as attention reads them (half the bytes per position).
    arena : a :class:`bitnet.Arena` to take the buffers from (and give them back to on growth
        and :meth:`release`), or None for plain numpy arrays.
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, capacity: int = INITIAL_CACHE_LENGTH,
        max_length: int | None = None, dtype: str = "float32", arena: Arena | None = None,
    ) -> None:
        sizes = [checks.positive_int(v, name) for v, name in ((layers, "layers"), (kv_heads, "kv_heads"),
                                                             (head_dim, "head_dim"), (capacity, "capacity"))]
        self.max_length = None if max_length is None else checks.positive_int(max_length, "max_length")
        errors.check_choice("KV cache dtype", dtype, CACHE_DTYPES)
        if arena is not None and not isinstance(arena, Arena):
            raise errors.DTypeError(f"arena must be a bn.Arena or None, got {type(arena).__name__}")
        self.dtype = dtype
        self.arena = arena
        capacity = sizes[3] if self.max_length is None else min(sizes[3], self.max_length)
        shape = (sizes[1], capacity, sizes[2])
        self._store(tuple(self._new(shape) for _ in range(sizes[0])), tuple(self._new(shape) for _ in range(sizes[0])))
        self.length = 0
        self.released = False

    @property
    def keys(self) -> tuple[np.ndarray, ...]:
        return self._keys

    @property
    def values(self) -> tuple[np.ndarray, ...]:
        return self._values

    def _store(self, keys: tuple[np.ndarray, ...], values: tuple[np.ndarray, ...]) -> None:
        """Hold these arrays, and the table of their addresses the attention kernels read them by."""
        self._keys, self._values = keys, values
        self._table = kernels.address_table(keys, values)
        self._checked_layout: tuple | None = None  # the layout these arrays last passed check() with

    def _new(self, shape: tuple[int, int, int]) -> np.ndarray:
        dtype = CACHE_DTYPES[self.dtype]
        if self.arena is not None:
            return self.arena.empty(shape, dtype)  # over its limit or the system's memory: ArenaLimitError
        try:
            # np.zeros maps pages lazily, so a large capacity costs memory only as positions fill.
            return np.zeros(shape, dtype)
        except MemoryError as exc:
            raise errors.OutOfMemoryError(
                f"a KV cache layer of {shape[1]} positions ({np.prod(shape) * np.dtype(dtype).itemsize:,} bytes of "
                f"keys) does not fit in memory ({exc}): ask for fewer positions, or make the cache with "
                "max_length (the model's new_cache() caps it at the model's context)"
            ) from None

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions in total, doubling the capacity as needed (up to ``max_length``).

        Raises InvalidValueError past ``max_length``; OutOfMemoryError (ArenaLimitError with an
        arena) when the memory for the grown layers cannot be had. Layers grow one by one (the
        peak is one layer more than the cache), so after that error some may be larger than
        others: ``layer`` then refuses the cache (ShapeError), it is never written past an array;
        make a new one.
        """
        self._check_live()
        if not checks.is_int(length) or length < 0:
            raise errors.InvalidValueError(f"reserve takes a number of positions (an integer >= 0), got {length!r:.80}")
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
        keys, values = list(self.keys), list(self.values)
        for store in (keys, values):
            for i, old in enumerate(store):
                grown = self._new((old.shape[0], capacity, old.shape[2]))
                grown[:, : self.length] = old[:, : self.length]
                store[i] = grown
                self._store(tuple(keys), tuple(values))  # first: the kernels' table never names a released array
                if self.arena is not None:
                    self.arena.release(old)

    def release(self) -> None:
        """Give the buffers back (to the arena, if the cache came from one); the cache is unusable after."""
        if self.arena is not None and not self.released:
            for array in (*self.keys, *self.values):
                self.arena.release(array)
        self._store((), ())
        self.length, self.released = 0, True

    def _check_live(self) -> None:
        if self.released:
            raise errors.InvalidValueError("this KV cache was released: make a new one with the model's new_cache()")

    def check(self, layers: int, kv_heads: int, head_dim: int) -> None:
        """Raise unless this cache has ``layers`` layers of ``(kv_heads, capacity, head_dim)`` keys and
        values of its dtype and a length within its capacity: the layout a model's kernels write into."""
        self._check_live()
        layout = (layers, kv_heads, head_dim, self.dtype)
        if layout == self._checked_layout:  # the same arrays passed already: a decode step checks the length only
            self._check_length(0)
            return
        if len(self.keys) != layers or len(self.values) != layers:
            raise errors.ShapeError(
                f"this KV cache has {len(self.keys)} layers, the model {layers}: make it with the model's new_cache()"
            )
        for index in range(layers):
            self.layer(index, kv_heads, head_dim, 0)
        self._checked_layout = layout

    def layer(self, index: int, kv_heads: int, head_dim: int, new: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of layer ``index`` as the kernels take them, checked to have room for ``new``
        positions after ``length``: float32 arrays, or a float16 cache's raw words as uint16.

        Raises ShapeError when the layer is missing or its arrays are not ``(kv_heads, capacity,
        head_dim)`` of the cache's dtype (a cache made for another model), or when the positions
        do not fit (call :meth:`reserve` first); InvalidValueError once the cache is released.
        """
        self._check_live()
        if not (checks.is_int(index) and checks.is_int(new)) or new < 0:
            raise errors.InvalidValueError(f"layer index and new positions must be integers (new >= 0), got "
                                           f"{index!r:.40} and {new!r:.40}")
        if not 0 <= index < len(self.keys) or len(self.values) != len(self.keys):
            raise errors.ShapeError(f"this KV cache has no layer {index}: make it with the model's new_cache()")
        keys, values = self.keys[index], self.values[index]
        expected = (kv_heads, self.capacity, head_dim)
        dtype = CACHE_DTYPES.get(self.dtype)
        for name, array in (("keys", keys), ("values", values)):
            if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != expected:
                got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
                raise errors.ShapeError(
                    f"KV cache {name} of layer {index} are {got}, the model needs {self.dtype} (kv_heads={kv_heads}, "
                    f"{self.capacity}, head_dim={head_dim}): make the cache with the model's new_cache()"
                )
        self._check_length(new)
        if keys.dtype == np.float16:
            return keys.view(np.uint16), values.view(np.uint16)
        return keys, values

    def _check_length(self, new: int) -> None:
        length = self.length
        if not isinstance(length, (int, np.integer)) or not 0 <= length <= self.capacity - new:
            raise errors.ShapeError(
                f"the cache length {length!r} plus {new} new positions must fit its capacity {self.capacity}: "
                f"call cache.reserve(length + new) first"
            )


class Attention(Tracked):
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
        self.projections = (q_proj, k_proj, v_proj)
        self.o_proj = o_proj
        self.sub_norm = sub_norm
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rope = rope
        self.qkv_proj = None
        self.hidden_size = q_proj.in_features if isinstance(q_proj, BitLinear) else 0
        self.check()
        self.heads, self.kv_heads, self.head_dim = int(heads), int(kv_heads), int(head_dim)
        self.scaling = self.head_dim**-0.5
        try:
            self.qkv_proj = BitLinear.stacked(list(self.projections))
            self.qkv_proj.tag = "self_attn.qkv_proj"
        except errors.InvalidValueError:
            self.qkv_proj = None
        for name, proj in zip(("q_proj", "k_proj", "v_proj", "o_proj"), (*self.projections, o_proj), strict=True):
            proj.tag = f"self_attn.{name}"

    def check(self, hidden: int | None = None) -> None:
        """Raise unless this attention can run over ``hidden`` features (its own, when None): a head
        layout of positive integers, ``heads`` a multiple of ``kv_heads``, projections of the
        layout's shapes (the stacked q/k/v one too), a sub-norm over ``heads * head_dim`` or None,
        and a rotary embedding of ``head_dim`` (``scaling`` is checked when it is assigned). The
        kernels check none of it, and a user may have assigned any of it since construction.
        """
        heads, kv_heads, head_dim = (checks.positive_int(v, name) for v, name in
                                     ((self.heads, "heads"), (self.kv_heads, "kv_heads"), (self.head_dim, "head_dim")))
        if heads % kv_heads:
            raise errors.ShapeError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        if hidden is not None and hidden != self.hidden_size:
            raise errors.ShapeError(f"the attention runs over {self.hidden_size} features, not the {hidden} given")
        hidden, q, kv = self.hidden_size, heads * head_dim, kv_heads * head_dim
        layout = f"{heads} heads ({kv_heads} key/value) of {head_dim} over {hidden} features"
        if not (isinstance(self.projections, tuple) and len(self.projections) == 3):
            raise errors.DTypeError("the attention's projections must be a tuple (q_proj, k_proj, v_proj)")
        shapes = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q)}
        for (name, shape), proj in zip(shapes.items(), (*self.projections, self.o_proj), strict=True):
            check_projection(proj, shape, name, layout)
        if self.qkv_proj is not None:
            check_projection(self.qkv_proj, (q + 2 * kv, hidden), "qkv_proj", layout)
        check_norm(self.sub_norm, q, "the attention sub-norm", optional=True)
        if not isinstance(self.rope, RotaryEmbedding) or self.rope.head_dim != head_dim:
            raise errors.ShapeError(f"the rotary embedding must be one of head_dim {head_dim}")

    @property
    def scaling(self) -> np.float32:
        """The factor of the scores (``head_dim ** -0.5`` by default): any positive number assigned is
        kept as float32, the type the kernels take."""
        return self._scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        self._scaling = np.float32(checks.positive_number(value, "the attention's scaling"))

    @property
    def running_linears(self) -> tuple[BitLinear, ...]:
        """The projections the forward pass calls: the stacked q/k/v one in place of its parts."""
        qkv = (self.qkv_proj,) if self.qkv_proj is not None else self.projections
        return (*qkv, self.o_proj)

    def _project(self, x: np.ndarray) -> np.ndarray:
        """Queries, keys and values side by side: ``(n, (heads + 2 kv_heads) head_dim)``."""
        if self.qkv_proj is not None:
            return self.qkv_proj._forward(x)
        parts = [proj._forward(x) for proj in self.projections]
        qkv = scratch.reused("self_attn.qkv", (x.shape[0], sum(p.shape[1] for p in parts)))
        np.concatenate(parts, axis=1, out=qkv)
        return qkv

    def __call__(self, x: np.ndarray, cache: KVCache, layer: int) -> np.ndarray:
        """Attend ``x`` (``(n, hidden)``, positions ``cache.length ..``) to itself and the cache.

        Writes this layer's keys and values into the cache; the caller advances
        ``cache.length`` once all layers have run.
        """
        checks.check_rows(x, "attention input", self.hidden_size)
        return self.batched(x, [(cache, slice(0, x.shape[0]))], layer)

    def batched(self, x: np.ndarray, sequences: list[tuple[KVCache, slice]], layer: int) -> np.ndarray:
        """Attention for rows of several sequences at once: ``sequences`` pairs each one's cache with
        its rows of ``x`` (consecutive, covering ``x``). The projections run once over all rows;
        each row attends over its own sequence's cache, all rows in one kernel call."""
        self.check()
        self.check_batch(x, sequences, layer)
        return self._batched(x, CacheRows(sequences), layer)

    def check_batch(self, x: np.ndarray, sequences: list[tuple[KVCache, slice]], layer: int) -> None:
        """Raise unless :meth:`batched` can run on these arguments: ``x`` float32 ``(n, hidden)``, the
        sequences' rows consecutive and covering ``x``, each cache with layer ``layer`` of this
        attention's layout and room for its rows (the attention itself is :meth:`check`'s)."""
        checks.check_rows(x, "attention input", self.hidden_size)
        _check_sequences(sequences, x.shape[0])
        for cache, rows in sequences:
            cache.layer(layer, self.kv_heads, self.head_dim, rows.stop - rows.start)

    def _batched(self, x: np.ndarray, rows: CacheRows, layer: int) -> np.ndarray:
        """:meth:`batched` for arguments :meth:`check_batch` passes, its sequences as ``rows``."""
        qkv = self._project(x)
        queries = scratch.reused("self_attn.queries", (x.shape[0], self.heads, self.head_dim))
        context = scratch.reused("self_attn.context", (x.shape[0], self.heads * self.head_dim))
        self.rope.reserve(rows.end)
        for group in rows.groups:
            group.rope(qkv, self.heads, self.kv_heads, self.rope.cos, self.rope.sin, group.rows, group.tables, layer,
                       group.template, queries)
            group.attend(queries, group.rows, group.tables, layer, group.template, self.scaling,
                         *group.scratch(self.heads), context)
        return self.o_proj._forward(context if self.sub_norm is None else self.sub_norm._forward(context))


class CacheRows:
    """The sequences of a batch as the attention kernels take them, worked out once for every layer.

    ``sequences`` pairs each sequence's :class:`KVCache` (checked by the caller) with its rows of
    the input. ``groups`` holds one :class:`CacheGroup` per cache dtype (one, as a rule);
    ``end`` is the most positions any cache holds after these rows (rope's reach).
    """

    def __init__(self, sequences: list[tuple[KVCache, slice]]) -> None:
        by_dtype: dict[str, list[tuple[KVCache, slice]]] = {}
        for cache, rows in sequences:
            by_dtype.setdefault(cache.dtype, []).append((cache, rows))
        self.groups = [CacheGroup(members) for members in by_dtype.values()]
        self.end = max(group.end for group in self.groups)


class CacheGroup:
    """Sequences whose caches share a dtype, as :func:`bitnet.kernels.attention.causal_attention` takes them.

    ``rows`` and ``tables`` are the kernels' tables of query rows and of cache addresses;
    ``template`` the kernels' view of the dtype; ``chunk`` the shortest chunk length among
    the rows; ``capacity`` the largest cache; ``end`` the most positions a cache holds after
    these rows; ``rope`` and ``attend`` the kernels (serial or threaded; ``threaded`` says which
    for attention) for these rows. All of it holds for every layer of a step, so the layers only
    look it up.
    """

    def __init__(self, members: list[tuple[KVCache, slice]]) -> None:
        caches = [cache for cache, _ in members]
        for cache, rows in members:  # the kernels write each row's keys and values at its position, unchecked
            cache._check_length(rows.stop - rows.start)
        self.capacity = max(cache.capacity for cache in caches)
        spans = [(rows.start, cache.length, rows.stop - rows.start) for cache, rows in members]
        self.rows = kernels.query_rows(spans, self.capacity)
        self.tables = np.stack([cache._table for cache in caches])
        kv_heads, _, head_dim = caches[0].keys[0].shape
        self.template = kernels.cache_template(kv_heads, head_dim, caches[0].keys[0].dtype)
        self.chunk = min(kernels.chunk_length(n, self.capacity) for _, _, n in spans)
        self.end = max(start + n for _, start, n in spans)
        self.rope = kernels.for_rope(len(self.rows))
        self.threaded = kernels.threaded_attention(len(self.rows), self.end)
        self.attend = kernels.ENTRY_POINTS[KERNEL_PATH, self.threaded]
        self._scratch: tuple[int, list[np.ndarray]] | None = None

    def scratch(self, heads: int) -> list[np.ndarray]:
        """The attention kernels' scratch for these rows and ``heads`` query heads: step temporaries
        (``bitnet.nn.scratch``) taken by the first layer and handed to the next ones. Sized by the
        caches' capacity, not their length, so decode steps reuse one set of buffers."""
        if self._scratch is None or self._scratch[0] != heads:
            kv_heads, _, head_dim = self.template.shape
            shapes = kernels.scratch_shapes(len(self.rows), self.chunk, heads, kv_heads, head_dim, self.capacity)
            self._scratch = (heads, [scratch.reused(f"self_attn.{name}", shape) for name, shape in shapes.items()])
        return self._scratch[1]


def _check_sequences(sequences: object, rows: int) -> None:
    """Raise unless ``sequences`` pairs distinct KVCaches with consecutive slices covering ``rows`` rows."""
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise errors.InvalidValueError("sequences must be a non-empty list of (KVCache, slice of rows) pairs")
    end = 0
    for pair in sequences:
        cache, part = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
        if not isinstance(cache, KVCache):
            raise errors.DTypeError(f"each sequence must be a (bn.nn.KVCache, slice) pair, got {pair!r:.80}")
        if not (isinstance(part, slice) and part.start == end and part.step in (None, 1)
                and checks.is_int(part.stop) and end < part.stop <= rows):
            raise errors.ShapeError(
                f"the sequences' row slices must be consecutive and cover the {rows} input rows: {part!r} follows "
                f"row {end}"
            )
        end = part.stop
    if end != rows:
        raise errors.ShapeError(f"the sequences' row slices cover {end} of the {rows} input rows")
    if len({id(cache) for cache, _ in sequences}) != len(sequences):
        raise errors.InvalidValueError("a KV cache appears twice among the sequences: each sequence needs its own")

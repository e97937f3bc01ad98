"""The arena: pooled, 64-byte aligned numpy arrays, released by hand or by frame."""

from __future__ import annotations

import math
import operator
import os
import sys
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from ..errors import (
    ArenaDoubleReleaseError,
    ArenaError,
    ArenaForeignArrayError,
    ArenaLimitError,
    DTypeError,
    InvalidValueError,
    ShapeError,
)
from .backend import ALIGNMENT, BlockBackend, CPUBlocks
from .pools import SMALL_LIMIT, CarvedPool, SizeClassPool

DEBUG_ENV = "BITNET_ARENA_DEBUG"
"""Environment variable that turns on debug mode for arenas created without an explicit ``debug``."""

_MAX_BYTES = sys.maxsize  # numpy cannot index past this; a bigger request is a wrong shape, not a big one

POISON_BYTE = 0xAB
"""Released integer and byte buffers are filled with this byte in debug mode (floats get NaN)."""

_Allocation = tuple  # (array, pool, block, offset, size): a plain tuple, the cheapest record to build

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class ArenaStats:
    """A consistent snapshot of an arena's counters (see :meth:`Arena.stats`).

    ``used_bytes + free_bytes == total_bytes`` always holds. Sizes count what the pools hand
    out (a request rounded up to its size class or grain), not the bytes the caller asked for.
    """

    used_bytes: int
    free_bytes: int
    total_bytes: int
    peak_bytes: int
    hits: int
    misses: int
    live_arrays: int
    limit: int | None


class Arena:
    """A pool of reusable, 64-byte aligned numpy buffers.

    Arrays come from pooled blocks: requests up to 256 KiB from power-of-two size classes
    (one whole block each), larger ones carved out of big blocks that are split on request and
    coalesced on release. After a warm-up, a loop that allocates the same shapes gets every
    buffer from the pool: no new memory, and a few microseconds per allocation.

    Parameters
    ----------
    backend : BlockBackend, optional
        Where raw blocks come from; :class:`CPUBlocks` (host memory) by default. A backend with
        ``supports_offsets=False`` gets whole blocks only, rounded up to size classes.
    debug : bool, optional
        Poison released buffers (NaN for floats, ``0xAB`` bytes otherwise), make the released
        array read-only, and tell a double release from a foreign array precisely. Defaults to
        the ``BITNET_ARENA_DEBUG`` environment variable (``1``/``true``/``yes``/``on``).
    limit : int, optional
        Most bytes the arena may hold from its backend (see :meth:`set_limit`); None for no limit.

    Raises
    ------
    InvalidValueError
        ``backend`` is not a BlockBackend, ``debug`` not a bool or None, or ``limit`` not an
        integer >= 0 or None.

    Notes
    -----
    Releasing an array (by hand or at the end of its frame) returns its memory to the pool,
    and the next allocation of a fitting size gets it. Any view of the released array still
    points at that memory: it stays valid to Python (no crash, the block is still allocated)
    but its contents change under it. Keeping such views is the caller's bug; debug mode makes
    it visible (NaN / ``0xAB`` contents, and writes through the released array raise).

    The arena keeps every live array until it is released: an array dropped without a release
    and outside any frame stays allocated, as with ``malloc`` without ``free``. Frames make
    that mistake hard to write.

    All methods are thread-safe; frames are per thread.

    Examples
    --------
    >>> import numpy as np
    >>> import bitnet as bn
    >>> arena = bn.Arena()
    >>> with arena.frame():
    ...     a = arena.empty((4, 2560), np.float32)
    ...     a.ctypes.data % 64
    0
    >>> arena.used_bytes()
    0
    """

    def __init__(self, backend: BlockBackend | None = None, debug: bool | None = None, limit: int | None = None):
        if backend is not None and not isinstance(backend, BlockBackend):
            raise InvalidValueError(
                f"backend must be a bitnet.memory.BlockBackend (name, supports_offsets, allocate, view, free), "
                f"got {type(backend).__name__}"
            )
        if debug is not None and not isinstance(debug, (bool, np.bool_)):
            raise InvalidValueError(f"debug must be True, False or None (from {DEBUG_ENV}), got {debug!r}")
        self._backend = CPUBlocks() if backend is None else backend
        self._debug = _debug_from_environment() if debug is None else bool(debug)
        self._lock = threading.Lock()
        self._frames = _FrameStacks()
        self._classes = SizeClassPool()
        # A backend that cannot bind offsets gets whole blocks of every size from the class pool.
        self._carved = CarvedPool() if self._backend.supports_offsets else None
        self._live: dict[int, _Allocation] = {}  # id(array) -> allocation; holds the array, so ids stay unique
        self._spans: dict[int, tuple[int, int]] = {}  # id(block) -> (first address, one past the last)
        self._released: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
        self._dtypes: dict[object, np.dtype] = {}
        self._used = self._total = self._peak = 0
        self._hits = self._misses = 0
        self._limit: int | None = None
        self.set_limit(limit)

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"Arena(backend={self._backend.name!r}, used={s.used_bytes}, total={s.total_bytes}, "
            f"live_arrays={s.live_arrays}, limit={s.limit}, debug={self._debug})"
        )

    @property
    def backend(self) -> BlockBackend:
        """The block backend this arena draws memory from."""
        return self._backend

    @property
    def debug(self) -> bool:
        """Whether released buffers are poisoned and misuse is diagnosed precisely."""
        return self._debug

    # ---------------------------------------------------------------- allocation

    def empty(self, shape: int | Sequence[int], dtype: DTypeLike = np.float32) -> np.ndarray:
        """An uninitialized C-contiguous array from the pool, 64-byte aligned.

        Parameters
        ----------
        shape : int or sequence of int
            Shape of the array.
        dtype : dtype-like, default float32
            Element type; any numpy dtype that holds no Python objects.

        Returns
        -------
        np.ndarray
            A plain, writable view onto pooled memory. It belongs to the innermost active
            :meth:`frame` of this thread, if any; otherwise release it with :meth:`release`.

        Raises
        ------
        ArenaLimitError
            A new block would take the arena over its limit. No array is handed out and live
            arrays are untouched (pooled free blocks may have been given back to make room).
        ShapeError
            ``shape`` is not an int or a sequence of ints (bools and floats refused), has a
            negative dimension, or needs more bytes than any address space holds.
        DTypeError
            ``dtype`` is not a numpy dtype, or holds Python objects.
        MemoryError
            The backend could not allocate a new block (the machine is out of memory).

        Examples
        --------
        >>> arena = Arena()
        >>> q = arena.empty((8, 2560), np.int8)
        >>> q.shape, q.dtype, q.ctypes.data % 64
        ((8, 2560), dtype('int8'), 0)
        >>> arena.release(q)
        """
        try:
            dtype = self._dtypes[dtype]
        except (KeyError, TypeError):  # first use of this dtype spelling, or an unhashable spec
            dtype = self._check_dtype(dtype)
        if type(shape) is not tuple:
            shape = (shape,) if isinstance(shape, (int, np.integer)) else _checked_shape(shape)
        try:
            nbytes = dtype.itemsize * math.prod(shape)
        except TypeError:  # a dimension that is not a number
            nbytes = None
        if type(nbytes) is not int or not 0 < nbytes <= _MAX_BYTES:  # numpy integers, floats, bad sizes
            shape = _checked_shape(shape)
            nbytes = dtype.itemsize * math.prod(shape)
            if nbytes > _MAX_BYTES:
                raise ShapeError(f"array shape {shape} of {dtype} needs {nbytes} bytes, more than any memory holds")
        if ALIGNMENT < nbytes <= SMALL_LIMIT:  # the common case, inlined: a power-of-two class
            pool, size = self._classes, 1 << (nbytes - 1).bit_length()
        else:
            pool = self._classes if nbytes <= SMALL_LIMIT or self._carved is None else self._carved
            size = pool.round(nbytes)
        with self._lock:
            found = pool.take(size)
            if found is None:
                block, offset = self._new_block(pool, size)
            else:
                block, offset = found
                self._hits += 1
            try:
                array = self._backend.view(block, offset, shape, dtype)
            except BaseException:
                pool.give(block, offset, size)
                _checked_shape(shape)  # an even number of negative dimensions shows only here
                raise
            self._live[id(array)] = (array, pool, block, offset, size)
            self._used += size
            if self._used > self._peak:
                self._peak = self._used
        stack = self._frames.stack
        if stack:
            stack[-1]._arrays.append(array)
        return array

    def zeros(self, shape: int | Sequence[int], dtype: DTypeLike = np.float32) -> np.ndarray:
        """Like :meth:`empty`, filled with zeros.

        Examples
        --------
        >>> arena = Arena()
        >>> int(arena.zeros(5, np.int32).sum())
        0
        """
        array = self.empty(shape, dtype)
        array.fill(0)
        return array

    def release(self, array: np.ndarray) -> None:
        """Give ``array``'s memory back to the pool; the next fitting allocation may reuse it.

        Parameters
        ----------
        array : np.ndarray
            An array returned by :meth:`empty` or :meth:`zeros` of this arena, not yet
            released. Views of it must not be used afterwards (see the class notes).

        Raises
        ------
        ArenaDoubleReleaseError
            ``array`` was already released (without debug mode, this is also the diagnosis
            for a view of an arena array, which the arena cannot tell apart cheaply).
        ArenaForeignArrayError
            ``array`` did not come from this arena.

        Examples
        --------
        >>> arena = Arena()
        >>> a = arena.empty(1000)
        >>> arena.release(a)
        >>> arena.empty(1000).ctypes.data == a.ctypes.data   # the same block, handed back
        True
        """
        with self._lock:
            allocation = self._live.pop(id(array), None)
            if allocation is None:
                raise self._not_live_error(array, "release")
            self._give_back(allocation)

    def frame(self) -> Frame:
        """A scope that releases every array allocated inside it, on this thread, on exit.

        Frames nest: an inner frame releases only its own arrays. Arrays released by hand
        inside a frame are skipped at exit. Use :meth:`Frame.keep` to let one array outlive
        its frame.

        Returns
        -------
        Frame
            A context manager; ``with arena.frame() as f:``.

        Examples
        --------
        >>> arena = Arena()
        >>> with arena.frame() as step:
        ...     scratch = arena.empty(4096, np.int8)
        ...     result = step.keep(arena.empty(16))
        >>> arena.used_bytes() == 64   # only ``result`` (16 float32 = one 64-byte class) is live
        True
        >>> arena.release(result)
        """
        return Frame(self)

    # ---------------------------------------------------------------- blocks and backends

    def block_of(self, array: np.ndarray) -> object:
        """The raw backend block that holds ``array`` (a whole metalcompute buffer, for Metal).

        Use :meth:`offset_of` for where the array starts in it; that is always 0 with a
        backend whose ``supports_offsets`` is False.

        Raises
        ------
        ArenaForeignArrayError
            ``array`` is not a live array of this arena.

        Examples
        --------
        >>> arena = Arena()
        >>> a = arena.empty(100)
        >>> block = arena.block_of(a)   # for CPUBlocks, a uint8 numpy buffer
        >>> bool(np.shares_memory(block, a))
        True
        """
        return self._live_allocation(array, "block_of")[2]

    def offset_of(self, array: np.ndarray) -> int:
        """Byte offset of ``array`` inside :meth:`block_of` ``(array)``.

        Raises
        ------
        ArenaForeignArrayError
            ``array`` is not a live array of this arena.
        """
        return self._live_allocation(array, "offset_of")[3]

    # ---------------------------------------------------------------- stats and limits

    def used_bytes(self) -> int:
        """Bytes handed out and not yet released (each request rounded up to its pool size)."""
        return self._used

    def free_bytes(self) -> int:
        """Bytes held from the backend but not handed out: ``total_bytes() - used_bytes()``."""
        with self._lock:
            return self._total - self._used

    def total_bytes(self) -> int:
        """Bytes held from the backend, in use or pooled."""
        return self._total

    def peak_bytes(self) -> int:
        """Highest :meth:`used_bytes` since the arena was made or :meth:`reset_peak` was called."""
        return self._peak

    def reset_peak(self) -> None:
        """Start measuring :meth:`peak_bytes` again from the current :meth:`used_bytes`."""
        with self._lock:
            self._peak = self._used

    def hit_count(self) -> int:
        """Allocations served from pooled memory."""
        return self._hits

    def miss_count(self) -> int:
        """Allocations that needed a new block from the backend."""
        return self._misses

    def stats(self) -> ArenaStats:
        """All counters at once, read under the lock so they agree with each other.

        Examples
        --------
        >>> s = Arena().stats()
        >>> s.used_bytes + s.free_bytes == s.total_bytes
        True
        """
        with self._lock:
            return ArenaStats(
                used_bytes=self._used,
                free_bytes=self._total - self._used,
                total_bytes=self._total,
                peak_bytes=self._peak,
                hits=self._hits,
                misses=self._misses,
                live_arrays=len(self._live),
                limit=self._limit,
            )

    def free_all_blocks(self) -> int:
        """Give every wholly free block back to the backend; live arrays are untouched.

        Returns
        -------
        int
            Bytes given back.
        """
        with self._lock:
            return self._drain_free_blocks()

    def set_limit(self, nbytes: int | None) -> None:
        """Cap the bytes the arena may hold from its backend (:meth:`total_bytes`).

        An allocation that needs a new block takes a smaller one, or gives pooled free blocks
        back, when that makes room; otherwise it raises :class:`ArenaLimitError`, and the arena
        stays consistent (live arrays and counters untouched). Lowering the limit below what is
        held gives free blocks back at once; live arrays are never taken away.

        Parameters
        ----------
        nbytes : int or None
            The limit in bytes, or None to remove it.

        Raises
        ------
        InvalidValueError
            ``nbytes`` is negative or not an integer.

        Examples
        --------
        >>> arena = Arena(limit=1 << 20)
        >>> try:
        ...     arena.empty(1 << 21, np.uint8)
        ... except ArenaLimitError:
        ...     print("over the limit")
        over the limit
        """
        if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 0):
            raise InvalidValueError(f"arena limit must be an integer >= 0 (bytes) or None (no limit), got {nbytes!r}")
        with self._lock:
            self._limit = None if nbytes is None else int(nbytes)
            if self._limit is not None and self._total > self._limit:
                self._drain_free_blocks()

    # ---------------------------------------------------------------- internals

    def _out_of_memory(self, block_size: int, exc: MemoryError) -> str:
        return (f"the {self._backend.name} backend could not allocate a block of {block_size:,} bytes ({exc}): "
                f"out of memory. Ask for smaller arrays, or free memory (arena.free_all_blocks())")

    def _new_block(self, pool: SizeClassPool | CarvedPool, size: int) -> tuple[object, int]:
        """After a pool miss (lock held): a new block, and ``(block, offset)`` of its first ``size`` bytes."""
        block_size = self._block_size_under_limit(size, pool.new_block_size(size))
        try:
            block = self._backend.allocate(block_size)
        except MemoryError as exc:
            if not self._drain_free_blocks():
                raise ArenaLimitError(self._out_of_memory(block_size, exc)) from None
            try:
                block = self._backend.allocate(block_size)  # retry once the pooled blocks are gone
            except MemoryError as again:
                raise ArenaLimitError(self._out_of_memory(block_size, again)) from None
        first = self._backend.view(block, 0, (block_size,), np.dtype(np.uint8))
        start = first.__array_interface__["data"][0]
        self._spans[id(block)] = (start, start + block_size)
        self._total += block_size
        self._misses += 1
        return block, pool.adopt(block, block_size, size)

    def _block_size_under_limit(self, size: int, block_size: int) -> int:
        """The size of the new block to ask for, so that the arena stays under its limit.

        Prefers the pool's preferred ``block_size``, then a block of just ``size`` bytes, and
        gives pooled free blocks back only when that is what makes room.
        """
        limit = self._limit
        if limit is None or self._total + block_size <= limit:
            return block_size
        if self._total + size <= limit:
            return size
        if self._used + size <= limit and self._drain_free_blocks():
            if self._total + block_size <= limit:
                return block_size
            if self._total + size <= limit:
                return size
        raise ArenaLimitError(
            f"allocating {size} bytes would take the arena to {self._total + size} bytes, over its limit of "
            f"{limit} ({self._used} bytes are in use by live arrays); release arrays or raise the limit "
            f"with set_limit()"
        )

    def _give_back(self, allocation: _Allocation) -> None:
        """Return a live allocation's memory to its pool (lock held; already out of ``_live``)."""
        if self._debug:
            self._poison(allocation)
        _, pool, block, offset, size = allocation
        pool.give(block, offset, size)
        self._used -= size

    def _release_all(self, arrays: Iterable[np.ndarray]) -> None:
        """Release the arrays that are still live; the rest were released by hand already.

        The caller holds every array in ``arrays``, so no other live array can have the same id.
        """
        live = self._live
        with self._lock:
            for array in arrays:
                allocation = live.pop(id(array), None)
                if allocation is not None:
                    self._give_back(allocation)

    def _drain_free_blocks(self) -> int:
        """Give every wholly free block back to the backend (lock held); the bytes given back."""
        freed = 0
        for pool in (self._classes, self._carved):
            if pool is None:
                continue
            for block, block_size in pool.drain():
                del self._spans[id(block)]
                self._backend.free(block)
                self._total -= block_size
                freed += block_size
        return freed

    def _poison(self, allocation: _Allocation) -> None:
        """Debug mode: fill the released memory with NaN / 0xAB and make the released array read-only."""
        array, _, block, offset, size = allocation
        # Sizes are multiples of 64 bytes, so a float region divides evenly into its own elements.
        if array.dtype.kind in "fc":
            region_dtype, poison = array.dtype, np.nan
        else:
            region_dtype, poison = np.dtype(np.uint8), POISON_BYTE
        self._backend.view(block, offset, (size // region_dtype.itemsize,), region_dtype).fill(poison)
        array.flags.writeable = False
        self._released[id(array)] = array

    def _live_allocation(self, array: np.ndarray, action: str) -> _Allocation:
        with self._lock:
            allocation = self._live.get(id(array))
            if allocation is None:
                raise self._not_live_error(array, action)
            return allocation

    def _not_live_error(self, array: object, action: str) -> ArenaError:
        """The most precise error for an array that is not a live allocation of this arena."""
        if self._debug and self._released.get(id(array)) is array:
            return ArenaDoubleReleaseError(
                f"{action}: this array was already released to the arena; release each arena array once, "
                f"and not after its frame has ended"
            )
        if not isinstance(array, np.ndarray) or not self._holds_address(array.__array_interface__["data"][0]):
            return ArenaForeignArrayError(
                f"{action}: this array was not allocated by this arena; pass only arrays returned by this "
                f"arena's empty() or zeros()"
            )
        if self._debug:
            return ArenaForeignArrayError(
                f"{action}: this array is a view or slice of arena memory, not an array the arena handed out; "
                f"pass the array returned by empty() or zeros() itself"
            )
        return ArenaDoubleReleaseError(
            f"{action}: this array was already released, or is a view of an arena array; pass each array "
            f"returned by empty() or zeros() itself, once (debug mode, BITNET_ARENA_DEBUG=1, tells which)"
        )

    def _holds_address(self, address: int) -> bool:
        return any(start <= address < end for start, end in self._spans.values())

    def _check_dtype(self, dtype: DTypeLike) -> np.dtype:
        try:
            checked = np.dtype(dtype)
        except (TypeError, ValueError):
            raise DTypeError(f"{dtype!r} is not a numpy dtype; pass one such as np.float32 or 'int8'") from None
        if checked.hasobject:
            raise DTypeError(
                f"arena arrays hold plain numbers, not Python objects; got dtype {checked}. "
                f"Allocate object arrays with np.empty"
            )
        try:
            self._dtypes[dtype] = checked
        except TypeError:  # an unhashable spelling, e.g. a list of fields: checked on every call
            pass
        return checked


class _FrameStacks(threading.local):
    """Each thread's stack of active frames, innermost last (``__init__`` runs once per thread)."""

    def __init__(self) -> None:
        self.stack: list[Frame] = []


class Frame:
    """The scope of :meth:`Arena.frame`: arrays allocated inside it on its thread are released on exit.

    Examples
    --------
    >>> arena = Arena()
    >>> with arena.frame():
    ...     with arena.frame():
    ...         inner = arena.empty(10)
    ...     outer = arena.empty(10)
    ...     arena.stats().live_arrays
    1
    """

    def __init__(self, arena: Arena):
        self._arena = arena
        self._arrays: list[np.ndarray] = []  # appended to by Arena.empty; holding them keeps their ids unique
        self._parent: Frame | None = None
        self._active = False

    def __enter__(self) -> Frame:
        if self._active:
            raise ArenaError("this frame is already active; make a new one with arena.frame() for each scope")
        stack = self._arena._frames.stack
        self._parent = stack[-1] if stack else None
        stack.append(self)
        self._active = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        stack = self._arena._frames.stack
        if not stack or stack[-1] is not self:
            raise ArenaError(
                "frames must end in the reverse order they started, on the thread that started them; "
                "use them as 'with arena.frame():' blocks"
            )
        stack.pop()
        self._active = False
        self._parent = None
        arrays, self._arrays = self._arrays, []
        self._arena._release_all(arrays)

    def keep(self, array: np.ndarray) -> np.ndarray:
        """Let ``array`` outlive this frame: it moves to the enclosing frame, or to the caller.

        With no enclosing frame, the caller releases it with :meth:`Arena.release`.

        Returns
        -------
        np.ndarray
            ``array`` itself, so ``out = f.keep(arena.empty(...))`` reads naturally.

        Raises
        ------
        ArenaForeignArrayError
            ``array`` was not allocated in this frame.
        """
        for i, mine in enumerate(self._arrays):
            if mine is array:
                del self._arrays[i]
                if self._parent is not None:
                    self._parent._arrays.append(array)
                return array
        raise ArenaForeignArrayError(
            "keep: this array was not allocated inside this frame; keep only arrays this frame's "
            "arena.empty()/zeros() calls returned"
        )


_default: Arena | None = None
_default_lock = threading.Lock()


def default_arena() -> Arena:
    """The process-wide arena, made on first use (debug mode from ``BITNET_ARENA_DEBUG``).

    Examples
    --------
    >>> import bitnet as bn
    >>> bn.default_arena() is bn.default_arena()
    True
    """
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Arena()
    return _default


def _checked_shape(shape: object) -> tuple[int, ...]:
    """``shape`` as a tuple of Python ints; ShapeError for a dimension that is negative or not an integer."""
    try:
        if any(isinstance(d, bool) for d in shape):  # operator.index takes True as 1
            raise TypeError
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ShapeError(f"array shape {shape!r} must be an int or a sequence of integers, e.g. (n, k)") from None
    if any(d < 0 for d in dims):
        raise ShapeError(f"array shape {shape} has a negative dimension; every dimension must be >= 0")
    return dims


def _debug_from_environment() -> bool:
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidValueError(
        f"{DEBUG_ENV}={os.environ[DEBUG_ENV]!r} is not understood; set it to 1 (debug on) or 0 (off)"
    )

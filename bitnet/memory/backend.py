"""Where an arena's raw memory comes from: the block backend interface and its CPU implementation.

An arena never allocates memory itself. It asks a :class:`BlockBackend` for raw blocks and
for numpy views of them, so the same pooling logic serves numpy buffers on the CPU and
device buffers (Metal's ``metalcompute`` buffers) elsewhere.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

ALIGNMENT = 64
"""Byte alignment of every array an arena hands out: one cache line, the widest SIMD load (AVX-512)."""


@runtime_checkable
class BlockBackend(Protocol):
    """A source of raw memory blocks that can be viewed as numpy arrays.

    Attributes
    ----------
    name : str
        Short name shown in stats and error messages (``"cpu"``, ``"metal"``).
    supports_offsets : bool
        True if :meth:`view` can start at any 64-byte aligned offset inside a block, so the
        arena may carve several arrays out of one block. False for backends that can only bind
        whole buffers (metalcompute): the arena then hands out whole blocks and never carves.

    Notes
    -----
    Blocks are opaque to the arena: it only passes them back to :meth:`view` and :meth:`free`,
    and hands them to callers through :meth:`bitnet.Arena.block_of`.
    """

    name: str
    supports_offsets: bool

    def allocate(self, nbytes: int) -> object:
        """Return a new raw block of at least ``nbytes`` bytes whose start is 64-byte aligned."""
        ...

    def view(self, block: object, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Return a writable, C-contiguous ``np.ndarray`` over ``block`` starting ``offset`` bytes in."""
        ...

    def free(self, block: object) -> None:
        """Drop ``block``: the arena never uses it again.

        Views made by :meth:`view` may still be alive (a caller's bug, but it happens); their
        memory must stay valid until they are collected, as it does for numpy buffers.
        """
        ...


class CPUBlocks:
    """Blocks of host memory held in numpy ``uint8`` buffers, with 64-byte aligned starts.

    numpy only promises 16-byte alignment, so each block over-allocates by ``ALIGNMENT`` bytes
    and starts at the first aligned byte of its buffer.

    Examples
    --------
    >>> backend = CPUBlocks()
    >>> block = backend.allocate(4096)
    >>> a = backend.view(block, 128, (4, 8), np.dtype(np.float32))
    >>> a.ctypes.data % 64
    0
    """

    name = "cpu"
    supports_offsets = True

    def allocate(self, nbytes: int) -> np.ndarray:
        raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
        return raw[start : start + nbytes]

    def view(self, block: np.ndarray, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.ndarray(shape, dtype, buffer=block, offset=offset)

    def free(self, block: np.ndarray) -> None:
        # The memory goes back when the last array viewing it is collected; a view the user still
        # holds keeps it alive, so a stale view reads stale data instead of crashing.
        del block

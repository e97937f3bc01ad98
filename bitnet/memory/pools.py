"""The two free-memory pools behind an arena: whole blocks by size class, and carved big blocks.

Pools only do bookkeeping: which memory is free, and which piece a request gets. They never
talk to a backend and never lock; the :class:`~bitnet.memory.Arena` does both. Every pool has
the same six methods, so the arena treats them alike:

``round(nbytes)``
    the size a request is actually given (its size class, or a multiple of the grain);
``take(size)``
    ``(block, offset)`` of free memory of that size, or None when the pool has none (a miss);
``adopt(block, block_size, size)``
    register a new block after a miss and hand out its first ``size`` bytes (offset 0);
``new_block_size(size)``
    how big the new block should be after a miss;
``give(block, offset, size)``
    take back memory handed out by ``take`` or ``adopt``;
``drain()``
    forget every wholly free block and return them as ``(block, block_size)`` pairs.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from .backend import ALIGNMENT

SMALL_LIMIT = 256 * 1024
"""Requests up to this many bytes get power-of-two size classes (the biggest class)."""

LARGE_GRAIN = 16 * 1024
"""Carved requests are rounded up to a multiple of this, so freed pieces fit later requests."""

LARGE_BLOCK = 4 * 1024 * 1024
"""Smallest block the carved pool asks for: several large requests share one block."""


def size_class(nbytes: int) -> int:
    """Round ``nbytes`` up to its size class.

    Powers of two from 64 bytes to ``SMALL_LIMIT``; above that, four classes per doubling
    (1, 1.25, 1.5, 1.75 times a power of two), which wastes at most 25% on big whole blocks.
    """
    if nbytes <= ALIGNMENT:
        return ALIGNMENT
    if nbytes <= SMALL_LIMIT:
        return 1 << (nbytes - 1).bit_length()
    quarter = 1 << ((nbytes - 1).bit_length() - 3)
    return -(-nbytes // quarter) * quarter


class SizeClassPool:
    """Whole blocks, one per allocation, kept in a free list per size class.

    A request takes the most recently freed block of its exact class (warm in cache); a
    block is never split, so this pool also serves backends that cannot bind offsets.
    """

    def __init__(self) -> None:
        self._free: dict[int, list[object]] = {}
        self.free_bytes = 0

    def round(self, nbytes: int) -> int:
        return size_class(nbytes)

    def take(self, size: int) -> tuple[object, int] | None:
        blocks = self._free.get(size)
        if not blocks:
            return None
        self.free_bytes -= size
        return blocks.pop(), 0

    def new_block_size(self, size: int) -> int:
        return size

    def adopt(self, block: object, block_size: int, size: int) -> int:
        return 0

    def give(self, block: object, offset: int, size: int) -> None:
        self._free.setdefault(size, []).append(block)
        self.free_bytes += size

    def drain(self) -> list[tuple[object, int]]:
        drained = [(block, size) for size, blocks in self._free.items() for block in blocks]
        self._free.clear()
        self.free_bytes = 0
        return drained


class CarvedPool:
    """Big blocks carved into regions: best fit on request, split, and coalesce on release.

    Free regions are kept sorted by size for a best-fit search with ``bisect``, and indexed by
    their start and end so a released region merges with free neighbours in its block. A block
    whose regions have all merged back is whole again and can be handed out in one piece or
    given back by ``drain``. Merging bounds fragmentation: free memory in a block is always a
    set of maximal gaps between live allocations.
    """

    def __init__(self) -> None:
        self._blocks: dict[int, tuple[object, int]] = {}  # id(block) -> (block, block_size)
        self._by_size: list[tuple[int, int, int]] = []  # sorted (size, id(block), offset)
        self._starts: dict[tuple[int, int], int] = {}  # (id(block), offset) -> size
        self._ends: dict[tuple[int, int], int] = {}  # (id(block), offset + size) -> offset
        self.free_bytes = 0

    def round(self, nbytes: int) -> int:
        return -(-nbytes // LARGE_GRAIN) * LARGE_GRAIN

    def take(self, size: int) -> tuple[object, int] | None:
        i = bisect_left(self._by_size, (size,))
        if i == len(self._by_size):
            return None
        region_size, key, offset = self._by_size[i]
        self._remove_region(key, offset, region_size)
        if region_size > size:
            self._add_region(key, offset + size, region_size - size)
        self.free_bytes -= size
        return self._blocks[key][0], offset

    def new_block_size(self, size: int) -> int:
        return max(size, LARGE_BLOCK)

    def adopt(self, block: object, block_size: int, size: int) -> int:
        key = id(block)
        self._blocks[key] = (block, block_size)
        if block_size > size:
            self._add_region(key, size, block_size - size)
            self.free_bytes += block_size - size
        return 0

    def give(self, block: object, offset: int, size: int) -> None:
        key = id(block)
        self.free_bytes += size
        left = self._ends.get((key, offset))
        if left is not None:
            left_size = offset - left
            self._remove_region(key, left, left_size)
            offset, size = left, size + left_size
        right_size = self._starts.get((key, offset + size))
        if right_size is not None:
            self._remove_region(key, offset + size, right_size)
            size += right_size
        self._add_region(key, offset, size)

    def drain(self) -> list[tuple[object, int]]:
        drained = []
        for key, (block, block_size) in list(self._blocks.items()):
            if self._starts.get((key, 0)) == block_size:
                self._remove_region(key, 0, block_size)
                del self._blocks[key]
                self.free_bytes -= block_size
                drained.append((block, block_size))
        return drained

    def _add_region(self, key: int, offset: int, size: int) -> None:
        insort(self._by_size, (size, key, offset))
        self._starts[(key, offset)] = size
        self._ends[(key, offset + size)] = offset

    def _remove_region(self, key: int, offset: int, size: int) -> None:
        del self._by_size[bisect_left(self._by_size, (size, key, offset))]
        del self._starts[(key, offset)]
        del self._ends[(key, offset + size)]

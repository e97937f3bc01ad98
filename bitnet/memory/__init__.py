"""Arena allocator: pooled, 64-byte aligned numpy buffers, so a steady-state forward pass allocates nothing.

``Arena`` hands out arrays from pooled blocks and takes them back with ``release`` or at the
end of a ``frame``. Raw blocks come from a ``BlockBackend``: ``CPUBlocks`` for host memory,
or a device backend (Metal) that can only bind whole buffers.

Modules: ``backend`` (the block interface and ``CPUBlocks``), ``pools`` (free-memory
bookkeeping: size classes and carved big blocks), ``arena`` (``Arena``, ``Frame``, stats,
debug mode, ``default_arena``).
"""

from .arena import DEBUG_ENV, POISON_BYTE, Arena, ArenaStats, Frame, default_arena
from .backend import ALIGNMENT, BlockBackend, CPUBlocks

__all__ = [
    "ALIGNMENT",
    "DEBUG_ENV",
    "POISON_BYTE",
    "Arena",
    "ArenaStats",
    "BlockBackend",
    "CPUBlocks",
    "Frame",
    "default_arena",
]

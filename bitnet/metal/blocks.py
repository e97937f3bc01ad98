"""Arena blocks in Metal memory: each block is one whole ``metalcompute`` buffer.

metalcompute binds buffers without offsets, so the arena never carves these blocks
(``supports_offsets = False``): every array it hands out is a whole buffer, which
``Arena.block_of`` returns for binding. Buffers use shared storage (unified memory), so the
numpy views read and write the very memory the GPU uses, with no copies.
"""

from __future__ import annotations

import math

import numpy as np


class MetalBlocks:
    """The :class:`bitnet.memory.BlockBackend` of a metalcompute device.

    Parameters
    ----------
    device : a ``metalcompute.Device`` (or anything with its ``buffer(nbytes)`` method).

    Examples
    --------
    >>> arena = bn.Arena(backend=MetalBlocks(mc.Device()))        # doctest: +SKIP
    >>> x = arena.empty((4, 2560), np.float32)                     # doctest: +SKIP
    >>> fn(count, arena.block_of(x), ...)                          # doctest: +SKIP
    """

    name = "metal"
    supports_offsets = False

    def __init__(self, device) -> None:
        self.device = device

    def allocate(self, nbytes: int) -> object:
        return self.device.buffer(nbytes)

    def view(self, block: object, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if offset != 0:
            raise ValueError("metalcompute buffers cannot be bound at an offset; the arena must not carve them")
        return np.frombuffer(block, dtype, count=math.prod(shape)).reshape(shape)

    def free(self, block: object) -> None:
        # metalcompute releases a buffer when its last reference goes; the arena drops its own here.
        pass

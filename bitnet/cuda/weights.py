"""Ternary weights resident on the GPU, uploaded once per PackedTernary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats import PackedTernary, kernel_layout

CACHE_KEY = "cuda"


@dataclass(frozen=True, eq=False)
class DeviceTernary:
    """A PackedTernary's codes and scale in GPU memory.

    Attributes
    ----------
    shape : ``(out_features, in_features)``.
    words : device uint32 array ``(out_features, kpad // 16)``: the ``i2`` payload read as
        little-endian words (``kpad``: ``in_features`` rounded up to 256). See
        ``bitnet.cuda.kernels`` for how a word decodes.
    scale : device float32 array ``(out_features,)``: the per-row scale, or the tensor
        scale repeated, so every kernel treats both granularities alike.
    """

    shape: tuple[int, int]
    words: object
    scale: object

    @property
    def kpad(self) -> int:
        return self.words.shape[1] * 16

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.scale.nbytes


def upload(w: PackedTernary) -> DeviceTernary:
    """Copy ``w`` to the GPU once; later calls return the copy cached in ``w.cache``.

    Any packing format is accepted: it is repacked to ``i2`` on the host first (through the
    integer codes, exactly). Only per-tensor and per-channel scales are supported, as in
    ``bn.matmul``.
    """
    cached = w.cache.get(CACHE_KEY)
    if cached is not None:
        return cached
    i2 = kernel_layout(w)
    from numba import cuda

    words = np.ascontiguousarray(i2.data).view("<u4")
    scale = np.broadcast_to(w.scale.reshape(-1), (w.shape[0],)).astype(np.float32)
    resident = DeviceTernary(tuple(w.shape), cuda.to_device(words), cuda.to_device(scale))
    w.cache[CACHE_KEY] = resident
    return resident

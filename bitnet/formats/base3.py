"""``base3``: 5 trits per byte (1.6 bits/weight), the densest practical ternary format.

Each row is padded with zeros to a multiple of 5; byte ``j`` holds ``W[r, 5j + i] + 1``
(i = 0..4) as ``v = sum(t_i * 3**(4 - i))`` stored as ``ceil(v * 256 / 243)``, the TQ1_0
encoding, so trit ``i`` decodes with a multiply and a shift (``kernels/packing.py``).
Scale per tensor or per row, kept beside the payload as float32.
"""

from __future__ import annotations

import numpy as np

from ..kernels import packing
from .base import Format, ceil_div, pad_columns, register

BLOCK = 5
SEGMENTS = np.array([[0, 1, 5]], np.int64)


def packed_shape(shape):
    return (shape[0], ceil_div(shape[1], BLOCK))


def encode(codes, scale, granularity):
    return packing.pack_trits(pad_columns(codes, BLOCK), BLOCK, SEGMENTS)


def decode(data, shape):
    return packing.unpack_trits(data, BLOCK, SEGMENTS)[:, : shape[1]]


BASE3 = register(Format("base3", __doc__.split("\n")[0], ("tensor", "channel"), packed_shape, encode, decode))

"""``i2_s``: bitnet.cpp's x86 I2_S layout (GGUF type 36 in its ggml fork).

The flattened tensor is padded with zeros to a multiple of 128 and stored as 32-byte
blocks of 128 weights: byte ``j`` holds elements ``j, j+32, j+64, j+96`` of the block as
``code + 1`` in bits 7-6, 5-4, 3-2, 1-0 (MSB first). A 32-byte tail follows whose first 4
bytes are the tensor's float32 scale (``ceil(n / 128) * 32 + 32`` bytes in all). One scale
per tensor only, as bitnet.cpp has.
"""

from __future__ import annotations

import numpy as np

from ..kernels import packing
from .base import Format, ceil_div, pad_columns, register

BLOCK = 128
TAIL = 32


def packed_shape(shape):
    return (ceil_div(shape[0] * shape[1], BLOCK) * BLOCK // 4 + TAIL,)


def encode(codes, scale, granularity):
    payload = packing.pack_2bit(pad_columns(codes.reshape(1, -1), BLOCK), BLOCK // 4, True)
    tail = np.zeros(TAIL, np.uint8)
    tail[:4] = np.asarray(scale, np.float32).reshape(1).view(np.uint8)
    return np.concatenate([payload.reshape(-1), tail])


def decode(data, shape):
    flat = packing.unpack_2bit(np.ascontiguousarray(data[:-TAIL]).reshape(1, -1), BLOCK // 4, True)
    return flat[0, : shape[0] * shape[1]].reshape(shape)


def stored_scale(data: np.ndarray) -> np.float32:
    """The float32 scale bitnet.cpp keeps in the tail."""
    return data[-TAIL:-TAIL + 4].view(np.float32)[0]


def code_fields(data):
    return data[:-TAIL].reshape(1, 1, -1)


I2_S = register(Format("i2_s", __doc__.split("\n")[0], ("tensor",), packed_shape, encode, decode,
                       scale_in_data=True, code_fields=code_fields))

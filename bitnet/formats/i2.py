"""``i2``: bitnet's own 2-bit layout, shaped for the CPU kernels.

Each row of ``W[m, k]`` is padded with zeros to a multiple of 256 and stored as 64-byte
blocks of 256 weights. Byte ``j`` (0..63) of block ``b`` holds ``W[r, 256 b + j + 64 i] + 1``
in bits ``2i..2i+1`` (i = 0..3, LSB first). One 64-byte load decodes, with a shift and a
mask per ``i``, into four vectors of 64 codes that line up with 64 *consecutive*
activations: the AVX-512 kernels need no shuffles, and 32-byte halves serve AVX2 the same
way. Scale: per tensor or per output row, kept beside the payload as float32.
"""

from __future__ import annotations

from ..kernels import packing
from .base import Format, ceil_div, pad_columns, register

BLOCK = 256
CHUNK = BLOCK // 4


def packed_shape(shape):
    return (shape[0], ceil_div(shape[1], BLOCK) * CHUNK)


def encode(codes, scale, granularity):
    return packing.pack_2bit(pad_columns(codes, BLOCK), CHUNK, False)


def decode(data, shape):
    return packing.unpack_2bit(data, CHUNK, False)[:, : shape[1]]


def code_fields(data):
    return data.reshape(data.shape[0], 1, -1)


I2 = register(Format("i2", __doc__.split("\n")[0], ("tensor", "channel"), packed_shape, encode, decode,
                     code_fields=code_fields))

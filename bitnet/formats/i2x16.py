"""``i2x16``: the ``i2`` codes with 16 rows interleaved, for the AVX-512 VNNI kernels.

Rows go in groups of 16 (the last group padded with zero weights) and each row is padded with
zeros to a multiple of 256 columns, as in ``i2``. A group is a run of 64-byte vectors, one per
16 columns: byte ``4 i + b`` of vector ``s`` holds ``W[16 g + i, 16 s + 4 f + b] + 1`` in bits
``2f..2f+1`` (f = 0..3, LSB first). One load, a shift and a mask give the codes of 4 adjacent
columns of all 16 rows, one row per 32-bit lane, which a ``vpdpbusd`` multiplies by 4
activations broadcast to every lane (``bitnet.kernels.ternary_lanes``). The same 2 bits a
weight as ``i2``; scale per tensor or per output row.
"""

from __future__ import annotations

from ..kernels import packing
from .base import Format, ceil_div, pad_columns, register
from .i2 import BLOCK  # columns are padded as in i2, so both layouts take the same padded activations

ROWS = 16


def packed_shape(shape):
    return (ceil_div(shape[0], ROWS), ceil_div(shape[1], BLOCK) * BLOCK * ROWS // 4)


def encode(codes, scale, granularity):
    return packing.pack_row_groups(pad_columns(codes, BLOCK), ROWS)


def decode(data, shape):
    return packing.unpack_row_groups(data, shape[0], ROWS)[:, : shape[1]]


def code_fields(data):
    return data.reshape(data.shape[0], 1, -1)


I2X16 = register(Format("i2x16", __doc__.split("\n")[0], ("tensor", "channel"), packed_shape, encode, decode,
                        code_fields=code_fields, row_group=ROWS))

"""``hf``: the HF transformers / mlx-lm BitNet layout (``quant_method: "bitnet"``).

``W[m, k]`` is stored as uint8 ``[ceil(m / 4), k]``: the output axis is cut into 4
contiguous chunks of ``c = ceil(m / 4)`` rows, and
bits ``2i..2i+1`` of ``packed[r, col]`` hold ``W[i c + r, col] + 1``; bits of rows past ``m``
are 0, as transformers' ``pack_weights`` leaves them. One scale per tensor
(the checkpoint's ``weight_scale``; whether a layer multiplies or divides by it is the
loader's business, here it always multiplies).
"""

from __future__ import annotations

import numpy as np

from ..kernels import packing
from .base import Format, ceil_div, pad_columns, register


def packed_shape(shape):
    return (ceil_div(shape[0], 4), shape[1])


def encode(codes, scale, granularity):
    # Flattened, the layout is one 2-bit block whose chunk is the first quarter of the rows:
    # field i of byte (r, col) holds element (i c + r, col). Columns are padded to a multiple of
    # 4 (sliced off below) so the chunk is whole uint32 words for the kernel.
    chunk_rows = ceil_div(codes.shape[0], 4)
    rows = np.pad(codes, ((0, 4 * chunk_rows - codes.shape[0]), (0, 0)), constant_values=-1)
    padded = np.ascontiguousarray(pad_columns(rows, 4))
    packed = packing.pack_2bit(padded.reshape(1, -1), padded.size // 4, False)
    return np.ascontiguousarray(packed.reshape(chunk_rows, -1)[:, : codes.shape[1]])


def decode(data, shape):
    padded = pad_columns(data, 4)
    codes = packing.unpack_2bit(padded.reshape(1, -1), padded.size, False)
    return codes.reshape(-1, padded.shape[1])[: shape[0], : shape[1]]


def code_fields(data):
    return data.reshape(data.shape[0], 1, -1)


HF = register(Format("hf", __doc__.split("\n")[0], ("tensor",), packed_shape, encode, decode, code_fields=code_fields))

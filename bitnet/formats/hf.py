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
    chunk = ceil_div(codes.shape[0], 4)
    columns = np.ascontiguousarray(pad_columns(codes.T, 4 * chunk, fill=-1))
    return np.ascontiguousarray(packing.pack_2bit(columns, chunk, False).T)


def decode(data, shape):
    columns = packing.unpack_2bit(np.ascontiguousarray(data.T), data.shape[0], False)
    return columns[:, : shape[0]].T


HF = register(Format("hf", __doc__.split("\n")[0], ("tensor",), packed_shape, encode, decode))

"""``tq2_0`` and ``tq1_0``: ggml's ternary block formats (llama.cpp, GGUF types 35 and 34).

Rows are padded with zeros to a multiple of 256 and stored block by block, byte-identical
to ``gguf.quants.quantize`` of the dequantized weights:

* TQ2_0, 66 bytes per 256 weights (2.0625 bits/weight): ``uint8 qs[64]; fp16 d``. In each
  32-byte half of ``qs`` (128 weights) byte ``j`` holds elements ``j + 32 i`` as
  ``code + 1`` in bits ``2i..2i+1``.
* TQ1_0, 54 bytes per 256 weights (1.6875 bits/weight): ``uint8 qs[48]; uint8 qh[4]; fp16 d``.
  ``qs[0:32]`` holds 5 trits of elements ``j + 32 i`` (weights 0..159), ``qs[32:48]`` 5 trits
  of ``160 + j + 16 i``, ``qh`` 4 trits of ``240 + j + 4 i``; see ``kernels/packing.py``.

``d`` is the block's absmax, i.e. the fp16 scale, and 0 for an all-zero block (as ggml
writes it). Scales per tensor, per row or per group of 256 fit; the exact float32 scale is
kept on the PackedTernary.
"""

from __future__ import annotations

import numpy as np

from .. import errors
from ..kernels import packing
from .base import Format, ceil_div, pad_columns, register

BLOCK = 256
TQ1_SEGMENTS = np.array([[0, 32, 5], [160, 16, 5], [240, 4, 4]], np.int64)


def _block_d(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """fp16 ``d`` of each block as bytes ``(m, nblocks, 2)``; ``codes`` already padded."""
    m, nblocks = codes.shape[0], codes.shape[1] // BLOCK
    per_block = np.broadcast_to(scale.reshape(-1, scale.shape[-1] if scale.ndim else 1), (m, nblocks))
    nonzero = codes.reshape(m, nblocks, BLOCK).any(axis=-1)
    with np.errstate(over="ignore"):
        d = np.where(nonzero, per_block, np.float32(0)).astype(np.float16)
    lost = nonzero & ((d == 0) | ~np.isfinite(d))
    if lost.any():
        bad = float(per_block[lost][0])
        raise errors.FormatError(
            f"scale {bad:g} cannot be stored as the fp16 block scale of TQ1_0/TQ2_0 (it would read back as "
            f"{float(d[lost][0]):g}); formats with float32 scales hold it: i2, hf, i2_s, base3"
        )
    return d.view(np.uint8).reshape(m, nblocks, 2)


def _with_d(qs: np.ndarray, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    m, nblocks = codes.shape[0], codes.shape[1] // BLOCK
    blocks = np.concatenate([qs.reshape(m, nblocks, -1), _block_d(codes, scale)], axis=-1)
    return blocks.reshape(m, -1)


def _without_d(data: np.ndarray, block_bytes: int) -> np.ndarray:
    m = data.shape[0]
    return np.ascontiguousarray(data.reshape(m, -1, block_bytes)[:, :, :-2].reshape(m, -1))


def _packed_shape(block_bytes: int):
    return lambda shape: (shape[0], ceil_div(shape[1], BLOCK) * block_bytes)


def code_fields_tq2_0(data):
    return data.reshape(data.shape[0], -1, 66)[:, :, :64]  # the fp16 d bytes hold no codes


def encode_tq2_0(codes, scale, granularity):
    codes = pad_columns(codes, BLOCK)
    return _with_d(packing.pack_2bit(codes, 32, False), codes, scale)


def decode_tq2_0(data, shape):
    return packing.unpack_2bit(_without_d(data, 66), 32, False)[:, : shape[1]]


def encode_tq1_0(codes, scale, granularity):
    codes = pad_columns(codes, BLOCK)
    return _with_d(packing.pack_trits(codes, BLOCK, TQ1_SEGMENTS), codes, scale)


def decode_tq1_0(data, shape):
    return packing.unpack_trits(_without_d(data, 54), BLOCK, TQ1_SEGMENTS)[:, : shape[1]]


_SCALES = ("tensor", "channel", "group")
TQ2_0 = register(Format("tq2_0", "ggml TQ2_0: 66-byte blocks of 256 (2-bit codes + fp16 d)", _SCALES,
                        _packed_shape(66), encode_tq2_0, decode_tq2_0, scale_in_data=True, group_size=BLOCK,
                        code_fields=code_fields_tq2_0))
TQ1_0 = register(Format("tq1_0", "ggml TQ1_0: 54-byte blocks of 256 (base-3 trits + fp16 d)", _SCALES,
                        _packed_shape(54), encode_tq1_0, decode_tq1_0, scale_in_data=True, group_size=BLOCK))

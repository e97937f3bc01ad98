"""Numba kernels that pack ternary codes into bytes and back.

Every format in ``bitnet.formats`` but one is one of two byte layouts, so two kernel pairs
serve them:

* **2-bit** (``i2``, ``hf``, ``tq2_0``, ``i2_s``): a row is cut into blocks of ``4 * chunk``
  codes; byte ``j`` of a block holds elements ``j, j + chunk, j + 2 chunk, j + 3 chunk``
  as ``code + 1`` in {0, 1, 2}, in bits 0-1, 2-3, 4-5, 6-7 (LSB first) or 7-6, 5-4, 3-2, 1-0
  (MSB first).
* **base-3** (``tq1_0``, ``base3``): a row is cut into blocks; a block is a list of
  segments ``(start, chunk, ntrits)`` whose bytes follow each other. Byte ``j`` of a segment
  holds the trits ``t_i = code + 1`` of elements ``start + j + i * chunk`` as
  ``v = sum(t_i * 3**(4 - i))`` stored as ``ceil(v * 256 / 243)``; trit ``i`` is read back
  without division as ``((byte * 3**i) mod 256) * 3 >> 8`` (ggml's TQ1_0 trick).

The third pair (``pack_row_groups`` / ``unpack_row_groups``) serves ``i2x16``, whose bytes mix 16
rows. Row lengths must be a whole number of blocks: callers pad with zero codes. The 2-bit kernels
work on uint32 words, four codes at a time, so their ``chunk`` must be a multiple of 4.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_KERNEL = dict(cache=True, nogil=True, boundscheck=False)


# Four int8 codes {-1, 0, 1} in a uint32 become four 2-bit fields {0, 1, 2}, with no carry or
# borrow between bytes: (c & 0x7F) + 1 maps 0xFF, 0x00, 0x01 to 0x80, 0x01, 0x02, whose low 2 bits
# are code + 1; and back, ((v | 0x80) - 1) ^ 0x80 maps 0, 1, 2 to 0xFF, 0x00, 0x01.
_LOW7 = np.uint32(0x7F7F7F7F)
_ONES = np.uint32(0x01010101)
_FIELD = np.uint32(0x03030303)
_HIGH = np.uint32(0x80808080)


@njit(**_KERNEL)
def _element_order(chunk, msb_first):
    """Offset of the element in bits 0-1 and the step to the next 2-bit field's element."""
    return (3 * chunk, -chunk) if msb_first else (0, chunk)


@njit(parallel=True, **_KERNEL)
def _pack_2bit_words(words, chunk, msb_first):
    """``pack_2bit`` on uint32 words (4 codes each); ``chunk`` counted in words."""
    rows, cols = words.shape
    first, step = _element_order(chunk, msb_first)
    out = np.empty((rows, cols // 4), np.uint32)
    for r in prange(rows):
        for b in range(cols // (4 * chunk)):
            src = 4 * b * chunk + first
            dst = b * chunk
            for j in range(chunk):
                f0 = ((words[r, src + j] & _LOW7) + _ONES) & _FIELD
                f1 = ((words[r, src + step + j] & _LOW7) + _ONES) & _FIELD
                f2 = ((words[r, src + 2 * step + j] & _LOW7) + _ONES) & _FIELD
                f3 = ((words[r, src + 3 * step + j] & _LOW7) + _ONES) & _FIELD
                out[r, dst + j] = f0 | (f1 << np.uint32(2)) | (f2 << np.uint32(4)) | (f3 << np.uint32(6))
    return out


@njit(parallel=True, **_KERNEL)
def _unpack_2bit_words(words, chunk, msb_first):
    """``unpack_2bit`` on uint32 words (4 bytes each); ``chunk`` counted in words."""
    rows, cols = words.shape
    first, step = _element_order(chunk, msb_first)
    codes = np.empty((rows, cols * 4), np.uint32)
    for r in prange(rows):
        for b in range(cols // chunk):
            src = b * chunk
            dst = 4 * b * chunk + first
            for j in range(chunk):
                w = words[r, src + j]
                for i in range(4):
                    field = (w >> np.uint32(2 * i)) & _FIELD
                    codes[r, dst + i * step + j] = ((field | _HIGH) - _ONES) ^ _HIGH
    return codes


def pack_2bit(codes: np.ndarray, chunk: int, msb_first: bool) -> np.ndarray:
    """int8 codes ``(rows, cols)`` -> uint8 ``(rows, cols // 4)``; ``chunk`` a multiple of 4."""
    return _pack_2bit_words(codes.view(np.uint32), chunk // 4, msb_first).view(np.uint8)


def unpack_2bit(data: np.ndarray, chunk: int, msb_first: bool) -> np.ndarray:
    """uint8 ``(rows, nbytes)`` -> int8 codes ``(rows, 4 nbytes)``; ``chunk`` a multiple of 4."""
    return _unpack_2bit_words(np.ascontiguousarray(data).view(np.uint32), chunk // 4, msb_first).view(np.int8)


@njit(parallel=True, **_KERNEL)
def pack_trits(codes, block, segments):
    """``segments`` rows are ``(start, chunk, ntrits)``; returns ``(rows, nblocks * bytes_per_block)``."""
    rows, cols = codes.shape
    per_block = 0
    for s in range(segments.shape[0]):
        per_block += segments[s, 1]
    out = np.empty((rows, (cols // block) * per_block), np.uint8)
    for r in prange(rows):
        dst = 0
        for b in range(cols // block):
            for s in range(segments.shape[0]):
                start = b * block + segments[s, 0]
                chunk = segments[s, 1]
                ntrits = segments[s, 2]
                for j in range(chunk):
                    v = 0
                    for i in range(5):
                        trit = codes[r, start + i * chunk + j] + 1 if i < ntrits else 0
                        v = v * 3 + trit
                    out[r, dst + j] = (v * 256 + 242) // 243
                dst += chunk
    return out


@njit(parallel=True, **_KERNEL)
def unpack_trits(data, block, segments):
    rows, nbytes = data.shape
    per_block = 0
    for s in range(segments.shape[0]):
        per_block += segments[s, 1]
    nblocks = nbytes // per_block
    codes = np.empty((rows, nblocks * block), np.int8)
    for r in prange(rows):
        src = 0
        for b in range(nblocks):
            for s in range(segments.shape[0]):
                start = b * block + segments[s, 0]
                chunk = segments[s, 1]
                pow3 = 1
                for i in range(segments[s, 2]):
                    for j in range(chunk):
                        byte = (np.int64(data[r, src + j]) * pow3) & 255
                        codes[r, start + i * chunk + j] = ((byte * 3) >> 8) - 1
                    pow3 *= 3
                src += chunk
    return codes


@njit(parallel=True, **_KERNEL)
def pack_row_groups(codes, rows):
    """int8 codes ``(m, kp)`` -> uint8 ``(ceil(m / rows), kp * rows // 4)``: ``rows`` rows interleaved.

    A group is a run of vectors of ``4 rows`` bytes, one per 16 columns (4 bytes of a row, 4
    2-bit fields each): byte ``4 i + b`` of vector ``s`` of group ``g`` holds, in bits
    ``2f..2f+1``, the code + 1 of row ``rows g + i`` and column ``16 s + 4 f + b``; rows past
    ``m`` hold code 0 (field 1). ``kp`` must be a multiple of 16.
    """
    m, kp = codes.shape
    groups = (m + rows - 1) // rows
    out = np.empty((groups, kp * rows // 4), np.uint8)
    for g in prange(groups):
        for s in range(kp // 16):
            for i in range(rows):
                r = rows * g + i
                for b in range(4):
                    byte = 0
                    for f in range(4):
                        field = codes[r, 16 * s + 4 * f + b] + 1 if r < m else 1
                        byte |= field << (2 * f)
                    out[g, 4 * rows * s + 4 * i + b] = byte
    return out


@njit(parallel=True, **_KERNEL)
def unpack_row_groups(data, m, rows):
    """``pack_row_groups`` backwards: int8 codes ``(m, kp)``."""
    kp = data.shape[1] * 4 // rows
    codes = np.empty((m, kp), np.int8)
    for g in prange(data.shape[0]):
        for s in range(kp // 16):
            for i in range(min(rows, m - rows * g)):
                for b in range(4):
                    byte = data[g, 4 * rows * s + 4 * i + b]
                    for f in range(4):
                        codes[rows * g + i, 16 * s + 4 * f + b] = ((byte >> (2 * f)) & 3) - 1
    return codes


@njit(parallel=True, **_KERNEL)
def holds_value_3(fields):
    """Whether any 2-bit field of the uint8 array ``fields`` (rows, blocks, bytes; any strides) is 3.

    A field is 3 when both its bits are set: ``byte & (byte >> 1)`` has a bit at an even position.
    """
    rows, blocks, nbytes = fields.shape
    found = 0
    for r in prange(rows):
        for b in range(blocks):
            for j in range(nbytes):
                found += (fields[r, b, j] & (fields[r, b, j] >> 1) & 0x55) != 0
    return found > 0

"""Numba kernels that pack ternary codes into bytes and back.

Every format in ``bitnet.formats`` is one of two byte layouts, so two kernel pairs serve
all of them:

* **2-bit** (``i2``, ``hf``, ``tq2_0``, ``i2_s``): a row is cut into blocks of ``4 * chunk``
  codes; byte ``j`` of a block holds elements ``j, j + chunk, j + 2 chunk, j + 3 chunk``
  as ``code + 1`` in {0, 1, 2}, in bits 0-1, 2-3, 4-5, 6-7 (LSB first) or 7-6, 5-4, 3-2, 1-0
  (MSB first).
* **base-3** (``tq1_0``, ``base3``): a row is cut into blocks; a block is a list of
  segments ``(start, chunk, ntrits)`` whose bytes follow each other. Byte ``j`` of a segment
  holds the trits ``t_i = code + 1`` of elements ``start + j + i * chunk`` as
  ``v = sum(t_i * 3**(4 - i))`` stored as ``ceil(v * 256 / 243)``; trit ``i`` is read back
  without division as ``((byte * 3**i) mod 256) * 3 >> 8`` (ggml's TQ1_0 trick).

Row lengths must be a whole number of blocks: callers pad with zero codes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_KERNEL = dict(cache=True, nogil=True, boundscheck=False)


@njit(**_KERNEL)
def _element_order(chunk, msb_first):
    """Offset of the element in bits 0-1 and the step to the next 2-bit field's element."""
    return (3 * chunk, -chunk) if msb_first else (0, chunk)


@njit(parallel=True, **_KERNEL)
def pack_2bit(codes, chunk, msb_first):
    rows, cols = codes.shape
    block = 4 * chunk
    # The four fields are written with constant shifts (so the loop over j vectorizes);
    # MSB-first order is the same bytes with the elements taken in reverse.
    first, step = _element_order(chunk, msb_first)
    out = np.empty((rows, cols // 4), np.uint8)
    for r in prange(rows):
        for b in range(cols // block):
            src = b * block + first
            dst = b * chunk
            for j in range(chunk):
                out[r, dst + j] = (np.uint8(codes[r, src + j] + 1)
                                   | (np.uint8(codes[r, src + step + j] + 1) << 2)
                                   | (np.uint8(codes[r, src + 2 * step + j] + 1) << 4)
                                   | (np.uint8(codes[r, src + 3 * step + j] + 1) << 6))
    return out


@njit(parallel=True, **_KERNEL)
def unpack_2bit(data, chunk, msb_first):
    rows, nbytes = data.shape
    first, step = _element_order(chunk, msb_first)
    codes = np.empty((rows, nbytes * 4), np.int8)
    for r in prange(rows):
        for b in range(nbytes // chunk):
            src = b * chunk
            dst = 4 * b * chunk + first
            for j in range(chunk):
                byte = data[r, src + j]
                codes[r, dst + j] = np.int8(byte & 3) - 1
                codes[r, dst + step + j] = np.int8((byte >> 2) & 3) - 1
                codes[r, dst + 2 * step + j] = np.int8((byte >> 4) & 3) - 1
                codes[r, dst + 3 * step + j] = np.int8(byte >> 6) - 1
    return codes


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

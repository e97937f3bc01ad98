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


@njit(parallel=True, **_KERNEL)
def pack_2bit(codes, chunk, msb_first):
    rows, cols = codes.shape
    block = 4 * chunk
    first_shift = 6 if msb_first else 0
    step = -2 if msb_first else 2
    out = np.empty((rows, cols // 4), np.uint8)
    for r in prange(rows):
        for b in range(cols // block):
            src = b * block
            dst = b * chunk
            for j in range(chunk):
                byte = 0
                for i in range(4):
                    byte |= (codes[r, src + i * chunk + j] + 1) << (first_shift + step * i)
                out[r, dst + j] = byte
    return out


@njit(parallel=True, **_KERNEL)
def unpack_2bit(data, chunk, msb_first):
    rows, nbytes = data.shape
    block = 4 * chunk
    first_shift = 6 if msb_first else 0
    step = -2 if msb_first else 2
    codes = np.empty((rows, nbytes * 4), np.int8)
    for r in prange(rows):
        for b in range(nbytes // chunk):
            src = b * chunk
            dst = b * block
            for i in range(4):
                shift = first_shift + step * i
                for j in range(chunk):
                    codes[r, dst + i * chunk + j] = ((data[r, src + j] >> shift) & 3) - 1
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

"""The ``i2`` block layout the ternary matmul kernels read, their shared constants, the output
step, and what the AMX tile loop reads: rows decoded to bytes (:func:`decode_rows`) and
activations in VNNI layout (:func:`vnni_activations`).

Layout (``bitnet.formats.i2``): row ``r`` of the weights is ``nb`` blocks of 64 bytes;
byte ``j`` of block ``b`` holds ``W[r, 256 b + 64 i + j] + 1`` in bits ``2i..2i+1``. The
activations come as an int8 buffer ``q`` of shape ``(n, 256 nb)``, zero past the true ``k``
(so the padded weight codes, stored as 1, add nothing).

The kernels multiply the *unsigned* stored codes ``c = w + 1`` in {0, 1, 2} by the signed
activations, which is what the x86 byte multiply-add instructions take, and subtract
``sum(q)`` once per token at the end (:func:`emit`): ``sum(w q) = sum(c q) - sum(q)``.

These constants are the contracts between the modules, not tunables (those live with the loop
they tune). Numba's on-disk cache checks only a kernel's own file: after editing a value here,
delete the caches (``find bitnet -name "*.nb[ic]" -delete``) or the old value stays compiled in.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import amx
from .simd import add_acc, and_bytes, load_bytes, shift_right_acc, shift_right_bytes, splat_bytes, store_vector

BLOCK = 256  # weights per i2 block
BLOCK_BYTES = 64  # bytes per i2 block
TILE_ROWS = 2  # rows of a GEMM tile
TILE_TOKENS = 8  # tokens of a GEMM tile: a tile's 16 sums come back row by row, TILE_TOKENS each

AMX_MIN_TOKENS = 32  # from this many tokens the amx path multiplies in tiles
AMX_MAX_K = 2**22  # int32 tile sums stay exact below this: 2**22 x 2 x 128 < 2**31
AMX_ROWS = 2 * amx.TILE_ROWS  # weight rows per tile pass (two code tiles)
AMX_TOKENS = 2 * amx.TILE_ROWS  # tokens per tile pass (two activation tiles)

KERNEL = dict(cache=True, nogil=True, boundscheck=False)


@njit(inline="always", **KERNEL)
def field_masks(isa):
    """The byte masks of the four 2-bit fields: ``byte & mask_i`` is field ``i``'s code times ``4**i``.

    Masking a field in place spares the shift that would bring it down: a kernel sums each
    field's products into its own accumulator and divides by ``4**i`` once (:func:`unmask`).
    """
    return splat_bytes(isa, 0x03), splat_bytes(isa, 0x0C), splat_bytes(isa, 0x30), splat_bytes(isa, 0xC0)


@njit(inline="always", **KERNEL)
def unmask(a0, a1, a2, a3):
    """The lane-wise sum of four accumulators of :func:`field_masks` products: ``a_i`` holds ``4**i`` times its sum.

    Exact while no lane of ``a3`` has left int32 (each lane is then a multiple of ``4**i``).
    """
    return add_acc(add_acc(a0, shift_right_acc(a1, 2)), add_acc(shift_right_acc(a2, 4), shift_right_acc(a3, 6)))


@njit(inline="always", **KERNEL)
def emit(t, r, total, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """Store one result: the int32 accumulator, or ``acc / a[t] * s[r]`` in float32.

    Inlined by Numba itself, so its five array arguments are not passed for every output.
    """
    value = np.int32(total - q_sum[t])
    if as_float:
        out[t, r] = np.float32(value) / act_scale[t] * scale[r * scale_step]
    else:
        acc[t, r] = value


@njit(inline="always", **KERNEL)
def emit_rows(t, first, sums, rows, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """``emit`` for token ``t`` and rows ``first .. first + rows - 1`` from ``sums[:rows]``.

    One loop per ``scale_step`` (0 or 1) with the step a constant, so that LLVM turns the
    loop into vector divides and multiplies (a scalar ``vdivss`` per output was 8% of a GEMM).
    """
    if scale_step == 0:
        for i in range(rows):
            emit(t, first + i, sums[i], q_sum, act_scale, scale, 0, acc, out, as_float)
    else:
        for i in range(rows):
            emit(t, first + i, sums[i], q_sum, act_scale, scale, 1, acc, out, as_float)


@njit(parallel=True, **KERNEL)
def vnni_activations(q, tiles):
    """Write ``q`` (n, kp) int8 into ``tiles``, int32 ``(kp // 64, 16, tokens)`` with ``tokens >= n``.

    Element ``[c, k4, t]`` holds the 4 activations ``64 c + 4 k4 .. + 3`` of token ``t`` (one
    int32 word of ``q``): a tile load at ``[c, 0, t0]`` with a row stride of ``4 tokens`` bytes
    is the activations tile of tokens ``t0 .. t0 + 15`` for k chunk ``c``. Columns ``t >= n``
    keep whatever they held: the sums of those tokens are never stored, and leaving them spares
    a pass over a buffer that is reused from call to call.
    """
    n, kp = q.shape
    words = q.view(np.int32)
    chunks, group, _ = tiles.shape
    for t in prange(n):  # each token writes its own column
        for c in range(chunks):
            for k4 in range(group):
                tiles[c, k4, t] = words[t, group * c + k4]


@njit(**KERNEL)
def decode_rows(isa, w, first, rows, codes):
    """Stored codes (0, 1, 2) of rows ``first .. first + rows - 1`` into ``codes[i, k]``, one byte each."""
    nb = w.shape[1] // BLOCK_BYTES
    kp = codes.shape[1]
    three = splat_bytes(isa, 3)
    for i in range(rows):
        for b in range(nb):
            x = load_bytes(isa, w, (first + i) * w.shape[1] + b * BLOCK_BYTES)
            for c in range(4):
                store_vector(codes, i * kp + b * BLOCK + 64 * c, and_bytes(shift_right_bytes(x, 2 * c), three))

"""Ternary matmul kernels: int8 activations times ``i2``-packed ternary weights, exact in int32.

Layout (``bitnet.formats.i2``): row ``r`` of the weights is ``nb`` blocks of 64 bytes;
byte ``j`` of block ``b`` holds ``W[r, 256 b + 64 i + j] + 1`` in bits ``2i..2i+1``. The
activations come as an int8 buffer ``q`` of shape ``(n, 256 nb)``, zero past the true ``k``
(so the padded weight codes, stored as 1, add nothing).

The kernels multiply the *unsigned* stored codes ``c = w + 1`` in {0, 1, 2} by the signed
activations, which is what the x86 byte multiply-add instructions take, and subtract
``sum(q)`` once per token at the end: ``sum(w q) = sum(c q) - sum(q)``.

Two kernels per instruction set:

* GEMV (``n == 1``, and the ``n % 8`` tokens left after the GEMM tiles): two rows at a time.
  Instead of shifting each byte to get code ``i``, it masks it in place
  (``byte & (3 << 2i)`` = ``c_i * 4**i``) into a separate accumulator per ``i``, and divides
  by ``4**i`` once at the end (exact: every lane is a multiple of ``4**i``). One load, four
  ``and`` and four multiply-adds per 256 weights; weights are prefetched 4 KB ahead. A task
  pairs row ``r`` with row ``r + half`` of its range, so each thread reads two streams of
  weights at once, which DRAM serves ~10% faster than one stream of adjacent rows.
* GEMM (``n >= 8``): a tile of 2 rows x 8 tokens (16 accumulators). Each 64-byte weight block
  is decoded (shift + mask) once into registers and reused for the 8 tokens, so the decode
  cost does not grow with ``n``. The k axis is cut into chunks so that a tile's activations
  stay in L1 while ``GEMM_ROWS`` rows pass over them.

Accumulator lanes are flushed into int64 totals every ``FOLD_BLOCKS`` blocks, so no int32
lane can overflow whatever ``k``; the result is exact whenever it fits in int32.

* AMX (the ``amx`` path, ``n >= 32``): all tokens go through Intel AMX tiles instead
  (``_gemm_amx``): 32 rows x 32 tokens per pass, the codes decoded to bytes once per 32
  rows, ``tdpbusd`` doing 16 x 16 x 64 byte multiply-adds at a time (``bitnet.kernels.amx``).

Work is split over output rows with ``prange``; every output value is computed by one
task in a fixed order, so results are bit-identical for any thread count. The SIMD
primitives come from ``simd.py``; ``PORTABLE`` selects plain Numba loops instead, for any CPU.

Scratch: the kernels allocate nothing. The caller passes the buffers ``scratch_shapes`` lists
(``bitnet.ops`` keeps them per shape, so repeated calls reuse them), one set per thread slot.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange
from numba.extending import overload

from . import amx
from .amx import TILE_CONFIG, load_config, release_tiles, tile_dot, tile_load, tile_store, tile_zero
from .quantize import quantize_padded, quantize_row
from .simd import (
    AMX,
    AVX2,
    AVX512VNNI,
    AVXVNNI,
    PORTABLE,
    add_acc,
    and_bytes,
    byte_vector_size,
    dot_acc,
    load_bytes,
    prefetch,
    shift_right_acc,
    shift_right_bytes,
    splat_bytes,
    sum_acc,
    zero_acc,
)

BLOCK = 256  # weights per i2 block
BLOCK_BYTES = 64  # bytes per i2 block
FOLD_BLOCKS = 8192  # blocks summed in int32 lanes before flushing to int64 (lanes stay < 2**31)
TILE_ROWS = 2
TILE_TOKENS = 8
K_CHUNK_BLOCKS = 12  # GEMM k-chunk: 8 tokens x 12 x 256 bytes of activations = 24 KB, fits L1
PARALLEL_TASKS = 32  # tasks the rows are cut into: even shares for 1, 2, 4, 8, 16 or 32 threads
GEMM_ROWS = 32  # rows a GEMM pass takes over one L1-resident activation tile (a multiple of TILE_ROWS)
PORTABLE_FLUSH_BLOCKS = 31  # 31 blocks x 1024 < 32767: int16 lanes of the portable path cannot overflow
# How far ahead of the loads the GEMV loop prefetches each of its two rows: DRAM latency needs
# several KB in flight per thread (4-16 KB stream the model's GEMVs ~25% faster than 1 KB; NOTES.md).
PREFETCH_BYTES = 4096

AMX_MIN_TOKENS = 32  # from this many tokens the amx path multiplies in tiles
AMX_MAX_K = 2**22  # int32 tile sums stay exact below this: 2**22 x 2 x 128 < 2**31
AMX_ROWS = 2 * amx.TILE_ROWS  # weight rows per tile pass (two code tiles)
AMX_TOKENS = 2 * amx.TILE_ROWS  # tokens per tile pass (two activation tiles)

# Scratch sets, one per thread of Numba's pool (bn.set_num_threads cannot go past its size), but no
# more than there are tasks: a slot runs its tasks one after the other on its own set.
SCRATCH_SLOTS = min(PARALLEL_TASKS, numba.config.NUMBA_NUM_THREADS)

_KERNEL = dict(cache=True, nogil=True, boundscheck=False)
# The scratch a path does not use, as constants: out of the entry points' arguments, they save
# ~0.5 us of dispatch a call. Per-slot ones have PARALLEL_TASKS rows (as many as any slot count;
# a constant cannot follow NUMBA_NUM_THREADS, as cached code keeps the value it was compiled with).
_NO_LANES = np.zeros((PARALLEL_TASKS, 0), np.int16)
_NO_WIDE = np.zeros((0, 0), np.int16)
_NO_CODES = np.zeros((PARALLEL_TASKS, 0, 0), np.uint8)
_NO_AMX_SUMS = np.zeros((PARALLEL_TASKS, 0, 0), np.int32)
_NO_TILES = np.zeros((0, 0, 0), np.int32)


# --- SIMD inner loops ------------------------------------------------------------------------


@njit(**_KERNEL)
def _unmask(a0, a1, a2, a3):
    """Sum of the four masked accumulators: accumulator ``i`` holds ``4**i`` times its true value."""
    folded = add_acc(add_acc(a0, shift_right_acc(a1, 2)), add_acc(shift_right_acc(a2, 4), shift_right_acc(a3, 6)))
    return sum_acc(folded)


@njit(**_KERNEL)
def _row_pair_simd(isa, w, r0, r1, q, t):
    """``sum(c q[t])`` for stored codes ``c`` of rows ``r0`` and ``r1`` (GEMV inner loop)."""
    nb = w.shape[1] // BLOCK_BYTES
    wb, kp = w.shape[1], q.shape[1]
    step = byte_vector_size(isa)
    mask0, mask1 = splat_bytes(isa, 0x03), splat_bytes(isa, 0x0C)
    mask2, mask3 = splat_bytes(isa, 0x30), splat_bytes(isa, 0xC0)
    total0 = 0
    total1 = 0
    for start in range(0, nb, FOLD_BLOCKS):
        a00, a01, a02, a03 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        a10, a11, a12, a13 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        for b in range(start, min(nb, start + FOLD_BLOCKS)):
            prefetch(w, r0 * wb + b * BLOCK_BYTES + PREFETCH_BYTES)
            prefetch(w, r1 * wb + b * BLOCK_BYTES + PREFETCH_BYTES)
            for h in range(0, BLOCK_BYTES, step):
                x0 = load_bytes(isa, w, r0 * wb + b * BLOCK_BYTES + h)
                x1 = load_bytes(isa, w, r1 * wb + b * BLOCK_BYTES + h)
                at = t * kp + b * BLOCK + h
                v = load_bytes(isa, q, at)
                a00 = dot_acc(isa, a00, and_bytes(x0, mask0), v)
                a10 = dot_acc(isa, a10, and_bytes(x1, mask0), v)
                v = load_bytes(isa, q, at + 64)
                a01 = dot_acc(isa, a01, and_bytes(x0, mask1), v)
                a11 = dot_acc(isa, a11, and_bytes(x1, mask1), v)
                v = load_bytes(isa, q, at + 128)
                a02 = dot_acc(isa, a02, and_bytes(x0, mask2), v)
                a12 = dot_acc(isa, a12, and_bytes(x1, mask2), v)
                v = load_bytes(isa, q, at + 192)
                a03 = dot_acc(isa, a03, and_bytes(x0, mask3), v)
                a13 = dot_acc(isa, a13, and_bytes(x1, mask3), v)
        total0 += _unmask(a00, a01, a02, a03)
        total1 += _unmask(a10, a11, a12, a13)
    return total0, total1


@njit(**_KERNEL)
def _tile_simd(isa, w, r0, r1, q, t, b0, b1):
    """``sum(c q[t + j])`` over blocks ``b0 .. b1 - 1`` for rows ``r0, r1`` x tokens ``t .. t + 7``.

    Returns 16 int64s: row ``r0`` for the 8 tokens, then row ``r1``. 16 accumulators and
    the 2 decoded code vectors fit the 32 AVX-512 registers; activations are memory operands.
    """
    wb, kp = w.shape[1], q.shape[1]
    step = byte_vector_size(isa)
    three = splat_bytes(isa, 3)
    s00 = s01 = s02 = s03 = s04 = s05 = s06 = s07 = 0
    s10 = s11 = s12 = s13 = s14 = s15 = s16 = s17 = 0
    for start in range(b0, b1, FOLD_BLOCKS):
        a00, a01, a02, a03 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        a04, a05, a06, a07 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        a10, a11, a12, a13 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        a14, a15, a16, a17 = zero_acc(isa), zero_acc(isa), zero_acc(isa), zero_acc(isa)
        for b in range(start, min(b1, start + FOLD_BLOCKS)):
            for h in range(0, BLOCK_BYTES, step):
                x0 = load_bytes(isa, w, r0 * wb + b * BLOCK_BYTES + h)
                x1 = load_bytes(isa, w, r1 * wb + b * BLOCK_BYTES + h)
                for i in range(4):
                    c0 = and_bytes(shift_right_bytes(x0, 2 * i), three)
                    c1 = and_bytes(shift_right_bytes(x1, 2 * i), three)
                    at = t * kp + b * BLOCK + 64 * i + h
                    v = load_bytes(isa, q, at)
                    a00, a10 = dot_acc(isa, a00, c0, v), dot_acc(isa, a10, c1, v)
                    v = load_bytes(isa, q, at + kp)
                    a01, a11 = dot_acc(isa, a01, c0, v), dot_acc(isa, a11, c1, v)
                    v = load_bytes(isa, q, at + 2 * kp)
                    a02, a12 = dot_acc(isa, a02, c0, v), dot_acc(isa, a12, c1, v)
                    v = load_bytes(isa, q, at + 3 * kp)
                    a03, a13 = dot_acc(isa, a03, c0, v), dot_acc(isa, a13, c1, v)
                    v = load_bytes(isa, q, at + 4 * kp)
                    a04, a14 = dot_acc(isa, a04, c0, v), dot_acc(isa, a14, c1, v)
                    v = load_bytes(isa, q, at + 5 * kp)
                    a05, a15 = dot_acc(isa, a05, c0, v), dot_acc(isa, a15, c1, v)
                    v = load_bytes(isa, q, at + 6 * kp)
                    a06, a16 = dot_acc(isa, a06, c0, v), dot_acc(isa, a16, c1, v)
                    v = load_bytes(isa, q, at + 7 * kp)
                    a07, a17 = dot_acc(isa, a07, c0, v), dot_acc(isa, a17, c1, v)
        s00, s01, s02, s03 = s00 + sum_acc(a00), s01 + sum_acc(a01), s02 + sum_acc(a02), s03 + sum_acc(a03)
        s04, s05, s06, s07 = s04 + sum_acc(a04), s05 + sum_acc(a05), s06 + sum_acc(a06), s07 + sum_acc(a07)
        s10, s11, s12, s13 = s10 + sum_acc(a10), s11 + sum_acc(a11), s12 + sum_acc(a12), s13 + sum_acc(a13)
        s14, s15, s16, s17 = s14 + sum_acc(a14), s15 + sum_acc(a15), s16 + sum_acc(a16), s17 + sum_acc(a17)
    return (s00, s01, s02, s03, s04, s05, s06, s07, s10, s11, s12, s13, s14, s15, s16, s17)


# --- portable inner loops (plain Numba; LLVM vectorizes them for the target CPU) ----------------


@njit(**_KERNEL)
def _row_portable(w, r, q, t, b0, b1, lanes):
    """``sum(c q[t])`` for row ``r`` over blocks ``b0 .. b1 - 1``, with int16 scratch ``lanes`` (64,).

    ``q`` may be int8 or int16 (the portable path passes int16, see ``_activations_for``).

    Lane ``j`` collects ``sum_i c(j + 64 i) q(j + 64 i)`` (at most 4 * 2 * 128 = 1024 a block)
    and is flushed every ``PORTABLE_FLUSH_BLOCKS`` blocks, before it could pass 32767.
    Written so LLVM vectorizes it well: 1-D slices indexed by ``range`` (2-D indexing with
    computed offsets keeps Numba's negative-index fix-up and becomes gathers, 14x slower),
    and int16 lanes (the widest type sets the vector length: 16 lanes per AVX2 register
    instead of 8 with int32; 3.2x faster than int32 sums in all).
    """
    total = 0
    for start in range(b0, b1, PORTABLE_FLUSH_BLOCKS):
        lanes[:] = 0
        for b in range(start, min(b1, start + PORTABLE_FLUSH_BLOCKS)):
            codes = w[r, b * BLOCK_BYTES : (b + 1) * BLOCK_BYTES]
            acts = q[t, b * BLOCK : (b + 1) * BLOCK]
            for j in range(BLOCK_BYTES):
                x = np.int16(codes[j])
                lanes[j] = np.int16(
                    lanes[j]
                    + (x & 3) * np.int16(acts[j])
                    + ((x >> 2) & 3) * np.int16(acts[64 + j])
                    + ((x >> 4) & 3) * np.int16(acts[128 + j])
                    + ((x >> 6) & 3) * np.int16(acts[192 + j])
                )
        for j in range(BLOCK_BYTES):
            total += lanes[j]
    return total


@njit(**_KERNEL)
def _row_pair_portable(w, r0, r1, q, t, b0, b1, lanes):
    """The portable GEMV step: rows ``r0`` and ``r1`` (one after the other) with token ``t``."""
    return _row_portable(w, r0, q, t, b0, b1, lanes), _row_portable(w, r1, q, t, b0, b1, lanes)


@njit(**_KERNEL)
def _tile_portable(w, r0, r1, q, t, b0, b1, lanes):
    """The portable GEMM tile, same result layout as ``_tile_simd``: 8 GEMV steps, no decode reuse."""
    s00, s10 = _row_pair_portable(w, r0, r1, q, t, b0, b1, lanes)
    s01, s11 = _row_pair_portable(w, r0, r1, q, t + 1, b0, b1, lanes)
    s02, s12 = _row_pair_portable(w, r0, r1, q, t + 2, b0, b1, lanes)
    s03, s13 = _row_pair_portable(w, r0, r1, q, t + 3, b0, b1, lanes)
    s04, s14 = _row_pair_portable(w, r0, r1, q, t + 4, b0, b1, lanes)
    s05, s15 = _row_pair_portable(w, r0, r1, q, t + 5, b0, b1, lanes)
    s06, s16 = _row_pair_portable(w, r0, r1, q, t + 6, b0, b1, lanes)
    s07, s17 = _row_pair_portable(w, r0, r1, q, t + 7, b0, b1, lanes)
    return (s00, s01, s02, s03, s04, s05, s06, s07, s10, s11, s12, s13, s14, s15, s16, s17)


# --- AMX tiles (the amx path, prefill-sized batches) --------------------------------------------


@njit(**_KERNEL)
def _decode_codes(w, first, rows, codes):
    """Stored codes (0, 1, 2) of rows ``first .. first + rows - 1`` into ``codes[i, k]``, one byte each."""
    nb = w.shape[1] // BLOCK_BYTES
    for i in range(rows):
        packed = w[first + i]
        row = codes[i]
        for b in range(nb):
            for j in range(BLOCK_BYTES):
                x = packed[b * BLOCK_BYTES + j]
                row[b * BLOCK + j] = x & 3
                row[b * BLOCK + 64 + j] = (x >> 2) & 3
                row[b * BLOCK + 128 + j] = (x >> 4) & 3
                row[b * BLOCK + 192 + j] = x >> 6


@njit(**_KERNEL)
def _gemm_amx(w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """Rows ``first .. last - 1`` x all ``n`` tokens with AMX tiles, 32 rows x 32 tokens a pass.

    Tiles 4, 5: the stored codes of 16 rows each (decoded to bytes once per 32 rows into
    ``codes``, uint8 ``(AMX_ROWS, kp)``); tiles 6, 7: 16 tokens' activations each (``tiles``
    from ``amx.vnni_activations``); tiles 0-3: the four 16 x 16 int32 sums, stored to ``sums``
    (int32 ``(AMX_ROWS, AMX_TOKENS)``). Rows past ``last`` and tokens past ``n`` are computed
    on whatever the buffers hold and never stored.
    """
    chunks, _, tokens = tiles.shape
    kp = chunks * amx.TILE_BYTES
    stride = tokens * 4
    load_config(TILE_CONFIG)
    for start in range(first, last, AMX_ROWS):
        rows = min(last - start, AMX_ROWS)
        _decode_codes(w, start, rows, codes)
        for t0 in range(0, tokens, AMX_TOKENS):
            tile_zero(0)
            tile_zero(1)
            tile_zero(2)
            tile_zero(3)
            for c in range(chunks):
                tile_load(4, codes, c * amx.TILE_BYTES, kp)
                tile_load(5, codes, amx.TILE_ROWS * kp + c * amx.TILE_BYTES, kp)
                at = c * amx.TILE_ROWS * tokens + t0
                tile_load(6, tiles, at, stride)
                tile_load(7, tiles, at + amx.TILE_ROWS, stride)
                tile_dot(0, 4, 6)
                tile_dot(1, 4, 7)
                tile_dot(2, 5, 6)
                tile_dot(3, 5, 7)
            tile_store(0, sums, 0, AMX_TOKENS * 4)
            tile_store(1, sums, amx.TILE_ROWS, AMX_TOKENS * 4)
            tile_store(2, sums, amx.TILE_ROWS * AMX_TOKENS, AMX_TOKENS * 4)
            tile_store(3, sums, amx.TILE_ROWS * AMX_TOKENS + amx.TILE_ROWS, AMX_TOKENS * 4)
            for j in range(min(AMX_TOKENS, n - t0)):  # token-major: each token's outputs are adjacent
                for i in range(rows):
                    _emit(t0 + j, start + i, sums[i, j], q_sum, act_scale, scale, scale_step, acc, out, as_float)
    release_tiles()


def _fill_tiles(isa, q, tiles):
    """``amx.vnni_activations`` on the amx path; compiled to nothing elsewhere (``tiles`` is empty there)."""


@overload(_fill_tiles, jit_options=_KERNEL)
def _fill_tiles_for(isa, q, tiles):
    if isa.isa == "amx":
        return lambda isa, q, tiles: amx.vnni_activations(q, tiles)
    return lambda isa, q, tiles: None


def _gemm_tiles(isa, w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """``_gemm_amx`` on the amx path; compiled to nothing elsewhere (no tile instructions there)."""


@overload(_gemm_tiles, jit_options=_KERNEL)
def _gemm_tiles_for(isa, w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc, out,
                    as_float):
    if isa.isa == "amx":
        return (lambda isa, w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc, out,
                as_float: _gemm_amx(w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc,
                                    out, as_float))
    return (lambda isa, w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc, out,
            as_float: None)


# --- one generic driver, specialised per instruction set at compile time -----------------------


def _row_pair(isa, w, r0, r1, q, t, lanes):
    """Compile-time dispatch to the GEMV inner loop of ``isa`` (see the overload below)."""


def _tile(isa, w, r0, r1, q, t, b0, b1, lanes):
    """Compile-time dispatch to the GEMM inner loop of ``isa``."""


@overload(_row_pair, jit_options=_KERNEL)
def _row_pair_for(isa, w, r0, r1, q, t, lanes):
    if isa.isa == "portable":

        def portable(isa, w, r0, r1, q, t, lanes):
            return _row_pair_portable(w, r0, r1, q, t, 0, w.shape[1] // BLOCK_BYTES, lanes)

        return portable
    return lambda isa, w, r0, r1, q, t, lanes: _row_pair_simd(isa, w, r0, r1, q, t)


@overload(_tile, jit_options=_KERNEL)
def _tile_for(isa, w, r0, r1, q, t, b0, b1, lanes):
    if isa.isa == "portable":
        return lambda isa, w, r0, r1, q, t, b0, b1, lanes: _tile_portable(w, r0, r1, q, t, b0, b1, lanes)
    return lambda isa, w, r0, r1, q, t, b0, b1, lanes: _tile_simd(isa, w, r0, r1, q, t, b0, b1)


def _activations_for(isa, q, wide):
    """``q`` as the inner loops of ``isa`` read it: int8 for SIMD, copied into int16 ``wide`` for portable."""


@overload(_activations_for, jit_options=_KERNEL)
def _activations_for_impl(isa, q, wide):
    if isa.isa == "portable":  # widen each activation once per call, not once per weight row: 12% faster

        def widened(isa, q, wide):
            for t in range(q.shape[0]):
                for j in range(q.shape[1]):
                    wide[t, j] = q[t, j]
            return wide

        return widened
    return lambda isa, q, wide: q


def scratch_shapes(path: str, n: int, k_padded: int) -> tuple[tuple[tuple[int, ...], type], ...]:
    """Shapes and dtypes of the scratch arrays the entry point of ``path`` takes, in argument order.

    Parameters
    ----------
    path : kernel path name (a key of ``ENTRY_POINTS``).
    n : number of tokens.
    k_padded : padded features, ``256 nb``.

    Returns
    -------
    tuple of ``(shape, dtype)``: ``gemm_sums`` on every path, then ``lanes`` and ``wide`` on
    the portable path, ``amx_codes``, ``amx_sums`` and ``amx_tiles`` on the amx path (see
    ``ternary_matmul``); those this call does not use have no elements. The shapes also say
    which loop each token takes: AMX tiles when ``amx_tiles`` has elements, else GEMM tiles
    for the first ``gemm_sums.shape[2]`` tokens, the GEMV loop for the rest. The per-task
    arrays have ``SCRATCH_SLOTS`` in front, one for each thread slot.
    """
    on_tiles = path == "amx" and n >= AMX_MIN_TOKENS and k_padded <= AMX_MAX_K
    shapes = (((SCRATCH_SLOTS, GEMM_ROWS, 0 if on_tiles else n - n % TILE_TOKENS), np.int64),)
    if path == "portable":
        shapes += (((SCRATCH_SLOTS, BLOCK_BYTES), np.int16), ((n, k_padded), np.int16))
    elif path == "amx":
        amx_rows, amx_k = (AMX_ROWS, k_padded) if on_tiles else (0, 0)
        amx_tokens = -(-n // AMX_TOKENS) * AMX_TOKENS if on_tiles else 0
        shapes += (
            ((SCRATCH_SLOTS, amx_rows, amx_k), np.uint8),
            ((SCRATCH_SLOTS, amx_rows, AMX_TOKENS), np.int32),
            ((amx_k // amx.TILE_BYTES, amx.TILE_ROWS, amx_tokens), np.int32),
        )
    return shapes


@njit(inline="always", **_KERNEL)
def _emit(t, r, total, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """Store one result: the int32 accumulator, or ``acc / a[t] * s[r]`` in float32.

    Inlined by Numba itself, so its five array arguments are not passed for every output.
    """
    value = np.int32(total - q_sum[t])
    if as_float:
        out[t, r] = np.float32(value) / act_scale[t] * scale[r * scale_step]
    else:
        acc[t, r] = value


@njit(**_KERNEL)
def _gemm_rows(isa, w, first_row, rows, q, tokens, sums, lanes):
    """``rows`` rows from ``first_row`` x the first ``tokens`` tokens (a multiple of 8) into ``sums``.

    Loop order keeps both operands close: for each tile of 8 tokens and each chunk of at
    most ``K_CHUNK_BLOCKS`` blocks, the tile's activations (8 x 3 KB) stay in L1 while every
    row pair of the task passes over them; ``sums[i, t]`` collects row ``first_row + i``.
    """
    nb = w.shape[1] // BLOCK_BYTES
    m = w.shape[0]
    chunks = (nb + K_CHUNK_BLOCKS - 1) // K_CHUNK_BLOCKS
    per_chunk = (nb + chunks - 1) // chunks
    sums[:rows, :tokens] = 0
    for t in range(0, tokens, TILE_TOKENS):
        for b0 in range(0, nb, per_chunk):
            b1 = min(nb, b0 + per_chunk)
            for i in range(0, rows, TILE_ROWS):
                r0 = first_row + i
                part = _tile(isa, w, r0, min(r0 + 1, m - 1), q, t, b0, b1, lanes)
                for j in range(TILE_TOKENS):
                    sums[i, t + j] += part[j]
                    sums[i + 1, t + j] += part[TILE_TOKENS + j]


@njit(parallel=True, **_KERNEL)
def ternary_matmul(isa, w, q, q_sum, act_scale, scale, scale_step, acc, out, as_float, gemm_sums, lanes, amx_codes,
                   amx_sums, amx_tiles):
    """``q @ (c - 1).T`` for i2 data ``w`` (m, 64 nb) and padded int8 ``q`` (n, 256 nb).

    Writes ``acc`` (int32, (n, m)) or, with ``as_float``, ``out`` (float32, (n, m)) =
    ``acc / act_scale[t] * scale[r * scale_step]`` (``scale_step`` 0 for one scale per tensor).
    The scratch arrays are those of ``scratch_shapes``, whose shapes pick the loops: when
    ``amx_tiles`` (``q`` as AMX tile operands) is not empty, every token goes through the AMX
    tile loop; otherwise the first ``gemm_sums.shape[2]`` tokens go through the GEMM tiles.

    The rows are cut into ``PARALLEL_TASKS`` tasks (fewer for small ``m``) of an even number of
    rows, dealt out in even runs to ``SCRATCH_SLOTS`` slots (one per thread of Numba's pool, as
    ``prange`` deals out the slots to the threads in use); a slot runs its tasks one after the
    other on ``gemm_sums[slot]``, ``lanes[slot]``, ``amx_codes[slot]`` and ``amx_sums[slot]``,
    and which slot or task computes a row never changes its value.
    Tokens go in tiles of ``TILE_TOKENS`` through the GEMM loop, ``GEMM_ROWS`` rows at a time;
    the rest (and ``n == 1``) through the GEMV loop, which takes row ``r`` of the task's first
    half with row ``r + half`` (an odd middle row alone) and rereads the pair from L1 for each token.
    """
    m = w.shape[0]
    n = q.shape[0]
    on_tiles = amx_tiles.shape[0] > 0
    tiled = n if on_tiles else gemm_sums.shape[2]
    per_task = -(-m // PARALLEL_TASKS)
    per_task += per_task % TILE_ROWS
    tasks = (m + per_task - 1) // per_task
    # Not numba.get_num_threads(): it compiles to the address of a function, and kernels using it cannot be cached.
    slots = min(tasks, gemm_sums.shape[0])
    for slot in prange(slots):
        sums, slot_lanes, codes, tile_sums = gemm_sums[slot], lanes[slot], amx_codes[slot], amx_sums[slot]
        for task in range(slot * tasks // slots, (slot + 1) * tasks // slots):
            first = task * per_task
            last = min(m, first + per_task)
            if on_tiles:
                _gemm_tiles(isa, w, first, last, amx_tiles, codes, tile_sums, n, q_sum, act_scale, scale, scale_step,
                            acc, out, as_float)
            elif tiled:
                for start in range(first, last, GEMM_ROWS):
                    rows = min(last - start, GEMM_ROWS)
                    _gemm_rows(isa, w, start, rows, q, tiled, sums, slot_lanes)
                    for t in range(tiled):  # token-major: each token's outputs are adjacent
                        for i in range(rows):
                            _emit(t, start + i, sums[i, t], q_sum, act_scale, scale, scale_step, acc, out, as_float)
            half = (last - first + 1) // 2
            for r0 in range(first, first + half):
                r1 = r0 + half if r0 + half < last else r0
                for t in range(tiled, n):
                    s0, s1 = _row_pair(isa, w, r0, r1, q, t, slot_lanes)
                    _emit(t, r0, s0, q_sum, act_scale, scale, scale_step, acc, out, as_float)
                    _emit(t, r1, s1, q_sum, act_scale, scale, scale_step, acc, out, as_float)


@njit(**_KERNEL)
def _matmul(isa, x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float, gemm_sums, lanes, wide, amx_codes,
            amx_sums, amx_tiles):
    """One entry for both operations, so each path compiles once.

    ``as_float``: quantize ``x`` into ``q``, ``act_scale``, ``q_sum`` and write the float32
    result into ``out``. Otherwise ``q`` (padded) and ``q_sum`` are given and the exact
    int32 accumulators go to ``acc``. Unused arrays may be empty. The scratch arrays, from
    ``gemm_sums`` on, are those of ``scratch_shapes`` and the empty ``_NO_*`` constants for
    the ones the path does not take (``wide``: the portable path's int16 copy of ``q``);
    nothing else is allocated.
    """
    if as_float:
        if x.shape[0] == 1:  # a parallel region for one row would cost more than the row
            quantize_row(x, 0, q, act_scale, q_sum)
        else:
            quantize_padded(x, q, act_scale, q_sum)
    if amx_tiles.shape[0]:
        _fill_tiles(isa, q, amx_tiles)
    ternary_matmul(isa, w, _activations_for(isa, q, wide), q_sum, act_scale, scale, scale_step, acc, out, as_float,
                   gemm_sums, lanes, amx_codes, amx_sums, amx_tiles)


# Entry points, one per path with the arguments of ``_matmul`` minus the ISA marker, which is
# a compile-time constant here (as an argument it would cost ~3 us of type dispatch per call),
# and minus the scratch the path does not use (``scratch_shapes``).


@njit(**_KERNEL)
def matmul_amx(x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float,
               gemm_sums, amx_codes, amx_sums, amx_tiles):
    _matmul(AMX, x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float,
            gemm_sums, _NO_LANES, _NO_WIDE, amx_codes, amx_sums, amx_tiles)


@njit(**_KERNEL)
def matmul_avx512vnni(x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float, gemm_sums):
    _matmul(AVX512VNNI, x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float,
            gemm_sums, _NO_LANES, _NO_WIDE, _NO_CODES, _NO_AMX_SUMS, _NO_TILES)


@njit(**_KERNEL)
def matmul_avxvnni(x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float, gemm_sums):
    _matmul(AVXVNNI, x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float,
            gemm_sums, _NO_LANES, _NO_WIDE, _NO_CODES, _NO_AMX_SUMS, _NO_TILES)


@njit(**_KERNEL)
def matmul_avx2(x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float, gemm_sums):
    _matmul(AVX2, x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float,
            gemm_sums, _NO_LANES, _NO_WIDE, _NO_CODES, _NO_AMX_SUMS, _NO_TILES)


@njit(**_KERNEL)
def matmul_portable(x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float, gemm_sums, lanes, wide):
    _matmul(PORTABLE, x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float,
            gemm_sums, lanes, wide, _NO_CODES, _NO_AMX_SUMS, _NO_TILES)


ENTRY_POINTS = {
    "amx": matmul_amx,
    "avx512vnni": matmul_avx512vnni,
    "avxvnni": matmul_avxvnni,
    "avx2": matmul_avx2,
    "portable": matmul_portable,
}

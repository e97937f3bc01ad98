"""Numba kernels for the embedding table used as the output head: ``logits = h @ table.T``.

The table is the biggest tensor of a BitNet model (128256 x 2560 for 2B4T) and is read
once per generated token, so these loops stream it once. bf16 and f16 rows arrive as raw
uint16 words and are widened to float32 in registers (a shift for bf16, ``vcvtph2ps`` for
f16) by one kernel compiled per ``WordFormat``, which also reads float32 tables as they are.

The int8 table is multiplied like llama.cpp's ``Q8_0 x Q8_0`` dot product: the hidden state
is quantized to int8 in blocks of ``INT8_BLOCK`` values, each with its own scale, so the
bytes meet in the CPU's byte multiply-adds (``vpdpbusd``) instead of being widened to float
one by one, which made the head compute bound at half the DRAM bandwidth (NOTES.md).
Those take one unsigned operand; with VNNI the table's bytes are offset by 128 and each
lane starts from ``-128 * sum(q)`` of its 4 activations: ``sum((t + 128) q) - 128 sum(q) =
sum(t q)``, exactly, in one ``xor`` and one ``vpdpbusd`` per 64 bytes (``simd.signed_dot``).

How rows are shared out depends on the tokens. One token (a decode step) goes through the
rows one at a time, each thread through its own consecutive rows: a single sequential stream
per thread, which the hardware prefetcher serves at ~32 GB/s on one Zen 4 core against
~22 GB/s for 4 rows read side by side. Several tokens go by groups of 4 rows, every token
over them, so each 64 bytes of a token's activations (and its offset and scales) are loaded
once for 4 rows; a token's activations and block scales (2.9 KB for 2B4T) and the 4 rows stay
in L1. Both ways give a row's logit of a token by the same operations in the same order, so
single and batched decoding agree to the bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from .quantize import quantize_blocks
from .simd import (
    add_floats,
    add_products,
    block_scales,
    byte_vector_size,
    lane,
    load_bytes,
    load_floats,
    load_four_floats,
    mul_floats,
    offset_sums,
    prefetch,
    scaled_add_floats,
    signed_dot,
    splat_acc,
    splat_floats,
    splat_four_bytes,
    store_vector,
    sum_floats,
    widen_four_words,
    widen_word,
    zero_floats,
)

# Hidden-state values per activation scale of the int8 head (ggml's Q8_0 block): 8 int32 lanes
# of a byte dot product, as ``simd.block_scales`` spreads each scale.
INT8_BLOCK = 32
HEAD_PREFETCH_ROWS = 2  # the head kernels prefetch the rows this far ahead of their own (NOTES.md)
LANES_PREFETCH_BYTES = 4096  # the lanes kernels prefetch their one stream this far ahead
# As in rows.py: vectorizable reductions, IEEE NaN/Inf kept, numpy's division semantics.
_KERNEL = dict(parallel=True, fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy", cache=True,
               nogil=True, boundscheck=False)
_ROW_KERNEL = {**_KERNEL, "parallel": False, "inline": "always"}  # the body of one prange iteration
# A called function, inlined by LLVM if at all: Numba's own inlining (above) retypes the body at each
# call site, which for the lanes tiles cost seconds of first-call compile time (NOTES.md).
_CALLED_KERNEL = {**_KERNEL, "parallel": False}


@njit(**_ROW_KERNEL)
def _row_pair(i, vocab):
    """Rows ``(i, i + half)`` of a table of ``vocab`` rows (the odd middle row alone: ``(i, i)``)."""
    half = (vocab + 1) // 2
    first = np.int64(i)
    return first, first + half if first + half < vocab else first


@njit(**_ROW_KERNEL)
def _row_groups(vocab):
    """How many groups of 4 rows ``_row_group`` cuts a table of ``vocab`` rows into."""
    return ((vocab + 1) // 2 + 1) // 2


@njit(**_ROW_KERNEL)
def _row_group(g, vocab):
    """The 4 rows of group ``g``: two adjacent rows from each half of the table, ``_row_pair(2 g)``
    and ``_row_pair(2 g + 1)`` (the last pair again when the pairs are odd, computed twice).

    The head kernels take rows in these groups, so that each thread streams two regions of the
    table at once, which DRAM serves 15% faster than one (NOTES.md), and each 64 bytes of a
    token's hidden state are loaded once for 4 rows.
    """
    pairs = (vocab + 1) // 2
    r0, r2 = _row_pair(2 * g, vocab)
    r1, r3 = _row_pair(min(2 * g + 1, pairs - 1), vocab)
    return r0, r1, r2, r3


@njit(**_ROW_KERNEL)
def _prefetch_next_group(table, r0, r1, r2, r3, t, j, span):
    """On token ``t == 0``, prefetch the lines of columns ``j .. j + span`` of the rows
    ``HEAD_PREFETCH_ROWS`` below each of the 4 (the next group).

    The group kernels call it at every step of their passes with the columns the step reads, so
    the next group arrives a line at a time along the first token's pass: the hardware
    prefetcher alone keeps too few lines in flight to stream 4 rows side by side at DRAM speed,
    and all of a group's lines at once before the pass stalled on the CPU's miss buffers instead
    of overlapping the work (int8, 2 threads, n = 1: 20.5-23.9 -> 13.8-14.3 ms; NOTES.md).
    """
    if t == 0:
        ahead = HEAD_PREFETCH_ROWS * table.shape[1] + j
        for e in range(0, span, 64 // table.itemsize):
            for r in (r0, r1, r2, r3):
                prefetch(table, r * table.shape[1] + ahead + e)


@njit(**_KERNEL)
def logits_words(isa, word_format, table, h, out):
    """``out[t, r] = sum_j float32(table[r, j]) * h[t, j]``; ``table`` is ``(V, K)`` uint16 words or float32.

    ``word_format`` (``BF16_WORDS``, ``F16_WORDS`` or ``F32_VALUES`` of ``bitnet.kernels.simd``)
    says what the table holds; ``h`` is C-contiguous. On x86 SIMD (``isa``) the words are widened in
    registers (a shift for bf16, ``vcvtph2ps`` for f16); the portable path is a plain loop that
    LLVM vectorizes.

    One token (decode) goes through the rows one at a time, each thread through its own
    consecutive rows: one sequential stream per thread, which the hardware prefetcher serves at
    ~32 GB/s on one Zen 4 core, against ~22 GB/s for 4 rows read side by side. Several tokens
    go by groups of 4 rows (``_row_group``), so that each vector of a token's hidden state is
    loaded once for 4 rows. Either way a row's logit of a token is the same sums in the same
    order (``_word_dot``), computed by one thread: the result depends neither on the number of
    threads nor on the number of tokens.
    """
    vocab = table.shape[0]
    if h.shape[0] == 1:
        for r in prange(vocab):
            _word_row(isa, word_format, table, h, out, r)
    else:
        for g in prange(_row_groups(vocab)):
            r0, r1, r2, r3 = _row_group(g, vocab)
            _word_rows(isa, word_format, table, h, out, r0, r1, r2, r3)


def _word_row(isa, word_format, table, h, out, r):
    """``out[t, r] = sum_j float32(table[r, j]) * h[t, j]`` for one row and every token."""


@overload(_word_row, jit_options=_ROW_KERNEL)
def _word_row_for(isa, word_format, table, h, out, r):
    if isa.isa == "portable":
        return lambda isa, word_format, table, h, out, r: _word_row_portable(word_format, table, h, out, r)

    def simd(isa, word_format, table, h, out, r):
        for t in range(h.shape[0]):
            _word_dot(isa, word_format, table, h, out, r, t)

    return simd


def _word_rows(isa, word_format, table, h, out, r0, r1, r2, r3):
    """``out[t, r] = sum_j float32(table[r, j]) * h[t, j]`` for 4 rows and every token."""


@overload(_word_rows, jit_options=_ROW_KERNEL)
def _word_rows_for(isa, word_format, table, h, out, r0, r1, r2, r3):
    if isa.isa == "portable":
        def portable(isa, word_format, table, h, out, r0, r1, r2, r3):
            for r in (r0, r1, r2, r3):
                _word_row_portable(word_format, table, h, out, r)

        return portable

    def simd(isa, word_format, table, h, out, r0, r1, r2, r3):
        for t in range(h.shape[0]):
            _word_dots_4(isa, word_format, table, h, out, r0, r1, r2, r3, t)

    return simd


@njit(**_ROW_KERNEL)
def _word_row_portable(word_format, table, h, out, r):
    """Plain loops for any CPU (LLVM vectorizes the widening and the sums)."""
    for t in range(h.shape[0]):
        out[t, r] = _word_total(word_format, table, h, np.float32(0.0), t, r, 0)


@njit(**_ROW_KERNEL)
def _word_dot(isa, word_format, table, h, out, r, t):
    """``out[t, r]``: float32 vectors of 16 (8 on AVX2) widened words in four fused multiply-add
    chains (one would wait on its own latency), summed in a fixed order (``_chains_total``), then
    the tail."""
    width = table.shape[1]
    step = byte_vector_size(isa) // 4
    whole = width - width % (4 * step)
    row, x = r * width, t * width
    a0 = a1 = a2 = a3 = zero_floats(isa)
    for j in range(0, whole, 4 * step):
        h0, h1, h2, h3 = load_four_floats(isa, h, x + j)
        a0, a1, a2, a3 = _add_chains(isa, word_format, table, row + j, h0, h1, h2, h3, a0, a1, a2, a3)
    out[t, r] = _word_total(word_format, table, h, _chains_total(a0, a1, a2, a3), t, r, whole)


@njit(**_ROW_KERNEL)
def _word_dots_4(isa, word_format, table, h, out, r0, r1, r2, r3, t):
    """``out[t, r]`` for 4 rows, each exactly as ``_word_dot`` computes it (16 chains), each vector of
    the token loaded once for the 4; the next group is prefetched along the first token's pass."""
    width = table.shape[1]
    step = byte_vector_size(isa) // 4
    whole = width - width % (4 * step)
    w0, w1, w2, w3, x = r0 * width, r1 * width, r2 * width, r3 * width, t * width
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = zero_floats(isa)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = zero_floats(isa)
    for j in range(0, whole, 4 * step):
        _prefetch_next_group(table, r0, r1, r2, r3, t, j, 4 * step)
        h0, h1, h2, h3 = load_four_floats(isa, h, x + j)
        a00, a01, a02, a03 = _add_chains(isa, word_format, table, w0 + j, h0, h1, h2, h3, a00, a01, a02, a03)
        a10, a11, a12, a13 = _add_chains(isa, word_format, table, w1 + j, h0, h1, h2, h3, a10, a11, a12, a13)
        a20, a21, a22, a23 = _add_chains(isa, word_format, table, w2 + j, h0, h1, h2, h3, a20, a21, a22, a23)
        a30, a31, a32, a33 = _add_chains(isa, word_format, table, w3 + j, h0, h1, h2, h3, a30, a31, a32, a33)
    out[t, r0] = _word_total(word_format, table, h, _chains_total(a00, a01, a02, a03), t, r0, whole)
    out[t, r1] = _word_total(word_format, table, h, _chains_total(a10, a11, a12, a13), t, r1, whole)
    out[t, r2] = _word_total(word_format, table, h, _chains_total(a20, a21, a22, a23), t, r2, whole)
    out[t, r3] = _word_total(word_format, table, h, _chains_total(a30, a31, a32, a33), t, r3, whole)


@njit(**_ROW_KERNEL)
def _add_chains(isa, word_format, table, at, h0, h1, h2, h3, a0, a1, a2, a3):
    """Four chains of one row, each advanced by one vector of the row's words (widened) from flat
    ``at`` on times the matching vector ``h0 .. h3`` of a token."""
    w0, w1, w2, w3 = widen_four_words(isa, word_format, table, at)
    return add_products(a0, w0, h0), add_products(a1, w1, h1), add_products(a2, w2, h2), add_products(a3, w3, h3)


@njit(**_ROW_KERNEL)
def _chains_total(a0, a1, a2, a3):
    """The sum of four chains' lanes, always in this order: the chains lane by lane, then the lanes."""
    return sum_floats(add_floats(add_floats(a0, a1), add_floats(a2, a3)))


@njit(**_ROW_KERNEL)
def _word_total(word_format, table, h, acc, t, r, start):
    """``acc`` plus the products of row ``r`` and token ``t`` from column ``start`` on."""
    for j in range(start, table.shape[1]):
        acc += widen_word(word_format, table[r, j]) * h[t, j]
    return acc


def _int8_rows(isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3):
    """``out[t, r] = row_scale[r] * sum_j table[r, j] q[t, j] block_scale[t, j // 32]`` for 4 rows."""


@overload(_int8_rows, jit_options=_ROW_KERNEL)
def _int8_rows_for(isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3):
    if isa.isa == "portable":
        def portable(isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3):
            for r in (r0, r1, r2, r3):
                _int8_row_portable(table, row_scale, q, block_scale, out, r)

        return portable
    return lambda isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3: _int8_rows_simd(
        isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3)


@njit(**_ROW_KERNEL)
def _int8_rows_simd(isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3):
    """Each run of 4 values meets in one int32 lane of a byte dot product, then gets its block's scale.

    The next group is prefetched along the first token's pass (``_prefetch_next_group``). The SIMD
    loads take flat indexes into the C-contiguous arrays: a ``reshape`` here would update the
    arrays' reference counts once per row from every thread, which cost a third of the time.
    """
    width = table.shape[1]
    blocks = block_scale.shape[1]
    step = byte_vector_size(isa)
    whole = width - width % step
    for t in range(q.shape[0]):
        total0, total1, total2, total3 = zero_floats(isa), zero_floats(isa), zero_floats(isa), zero_floats(isa)
        for j in range(0, whole, step):
            _prefetch_next_group(table, r0, r1, r2, r3, t, j, step)
            x = load_bytes(isa, q, t * width + j)
            offset = offset_sums(isa, x)
            scales = block_scales(isa, block_scale, t * blocks + j // INT8_BLOCK)
            total0 = _int8_step(isa, table, r0 * width + j, x, offset, scales, total0)
            total1 = _int8_step(isa, table, r1 * width + j, x, offset, scales, total1)
            total2 = _int8_step(isa, table, r2 * width + j, x, offset, scales, total2)
            total3 = _int8_step(isa, table, r3 * width + j, x, offset, scales, total3)
        out[t, r0] = _row_total(table, row_scale, q, block_scale, sum_floats(total0), t, r0, whole)
        out[t, r1] = _row_total(table, row_scale, q, block_scale, sum_floats(total1), t, r1, whole)
        out[t, r2] = _row_total(table, row_scale, q, block_scale, sum_floats(total2), t, r2, whole)
        out[t, r3] = _row_total(table, row_scale, q, block_scale, sum_floats(total3), t, r3, whole)


def _int8_row(isa, table, row_scale, q, block_scale, out, r):
    """``out[t, r] = row_scale[r] * sum_j table[r, j] q[t, j] block_scale[t, j // 32]`` for one row."""


@overload(_int8_row, jit_options=_ROW_KERNEL)
def _int8_row_for(isa, table, row_scale, q, block_scale, out, r):
    if isa.isa == "portable":
        return lambda isa, table, row_scale, q, block_scale, out, r: _int8_row_portable(
            table, row_scale, q, block_scale, out, r)
    return lambda isa, table, row_scale, q, block_scale, out, r: _int8_row_simd(
        isa, table, row_scale, q, block_scale, out, r)


@njit(**_ROW_KERNEL)
def _int8_row_simd(isa, table, row_scale, q, block_scale, out, r):
    """One row of ``_int8_rows_simd``: the same steps (``_int8_step``) in the same order, without the
    group's prefetch."""
    width = table.shape[1]
    blocks = block_scale.shape[1]
    step = byte_vector_size(isa)
    whole = width - width % step
    for t in range(q.shape[0]):
        total = zero_floats(isa)
        for j in range(0, whole, step):
            x = load_bytes(isa, q, t * width + j)
            scales = block_scales(isa, block_scale, t * blocks + j // INT8_BLOCK)
            total = _int8_step(isa, table, r * width + j, x, offset_sums(isa, x), scales, total)
        out[t, r] = _row_total(table, row_scale, q, block_scale, sum_floats(total), t, r, whole)


@njit(**_ROW_KERNEL)
def _int8_step(isa, table, at, x, offset, scales, total):
    """``total`` plus one vector of a row's products: the table's bytes from flat ``at`` on times the
    token's bytes ``x`` (exact, in int32 lanes: ``signed_dot``), each lane times its block's scale."""
    return scaled_add_floats(total, signed_dot(isa, load_bytes(isa, table, at), x, offset), scales)


@njit(**_ROW_KERNEL)
def _row_total(table, row_scale, q, block_scale, acc, t, r, start):
    """``acc`` plus the scaled products of row ``r`` and token ``t`` from value ``start`` on, times the row's scale."""
    for j in range(start, table.shape[1]):
        acc += np.float32(np.int32(table[r, j]) * np.int32(q[t, j])) * block_scale[t, j // INT8_BLOCK]
    return acc * row_scale[r]


@njit(**_ROW_KERNEL)
def _int8_row_portable(table, row_scale, q, block_scale, out, r):
    """Plain loops for any CPU: an int32 dot product per block, then its scale."""
    width = table.shape[1]
    for t in range(q.shape[0]):
        acc = np.float32(0.0)
        for start in range(0, width, INT8_BLOCK):
            dot = np.int32(0)
            for j in range(start, min(width, start + INT8_BLOCK)):
                dot += np.int32(table[r, j]) * np.int32(q[t, j])
            acc += np.float32(dot) * block_scale[t, start // INT8_BLOCK]
        out[t, r] = acc * row_scale[r]


@njit(**_KERNEL)
def logits_int8(isa, table, row_scale, h, q, block_scale, out):
    """``out[t, r] ~ row_scale[r] * sum_j table[r, j] * h[t, j]`` for an int8 ``table`` ``(V, K)``.

    ``h`` is first quantized into ``q`` (int8, ``(n, K)``) and ``block_scale`` (float32,
    ``(n, ceil(K / INT8_BLOCK))``) by ``quantize_blocks`` in blocks of ``INT8_BLOCK``: the
    products are exact integers, each block's sum is scaled once. A token with NaN or Inf in
    ``h`` gets NaN logits. ``isa`` is a ``bitnet.kernels.simd`` marker.

    One token (decode) goes through the rows one at a time, one sequential stream per thread
    (as ``logits_words``); several go by groups of 4 rows (``_row_group``). Either way a row's
    logit of a token is the same sums in the same order, computed by one thread: the result
    depends neither on the number of threads nor on the number of tokens.
    """
    for t in range(h.shape[0]):
        quantize_blocks(h, t, q, block_scale, INT8_BLOCK)
    vocab = table.shape[0]
    if h.shape[0] == 1:
        for r in prange(vocab):
            _int8_row(isa, table, row_scale, q, block_scale, out, r)
    else:
        for g in prange(_row_groups(vocab)):
            r0, r1, r2, r3 = _row_group(g, vocab)
            _int8_rows(isa, table, row_scale, q, block_scale, out, r0, r1, r2, r3)


@njit(cache=True, nogil=True)
def rows_words(word_format, table, ids, out):
    """``out[i] = float32(table[ids[i]])`` for a table of uint16 words in ``word_format``."""
    for i in range(ids.shape[0]):
        row = ids[i]  # read once: ``out`` might alias ``ids`` for all LLVM knows, which kept the loop scalar
        for j in range(table.shape[1]):
            out[i, j] = widen_word(word_format, table[row, j])


@njit(cache=True, nogil=True)
def rows_int8(table, row_scale, ids, out):
    """``out[i] = float32(table[ids[i]]) * row_scale[ids[i]]`` for an int8 table."""
    for i in range(ids.shape[0]):
        row = ids[i]
        scale = row_scale[row]
        for j in range(table.shape[1]):
            out[i, j] = np.float32(table[row, j]) * scale


# --- the int8 table with 16 rows in the vector lanes (AVX-512 VNNI) --------------------------------------------
#
# Several tokens over a row-major table cost, per 64 bytes of a row and token, a multiply-add, an
# int-to-float conversion and a scaled add: the block scales fall inside every vector. With 16 rows
# interleaved (``interleave_int8``: one 64-byte vector holds 4 adjacent values of each of 16 rows, one
# row per int32 lane), the 4 activations of a token are broadcast to every lane, each lane sums a
# whole block of 32 exactly in int32 (8 multiply-adds), and the block's scale, the same for the 16
# rows, is applied once: a 64-byte vector of the table then costs one multiply-add per token, and
# is loaded once for a tile of 8 tokens (NOTES.md).

INT8_GROUP = 16  # table rows per vector of the lanes layout
LANES_PATHS = ("amx", "avx512vnni")  # the paths whose int8 head reads the lanes layout (512-bit vpdpbusd)


def lanes_shape(vocab: int, width: int) -> tuple[int, int]:
    """The shape of ``interleave_int8``'s result for a ``(vocab, width)`` table: rows padded to 16,
    values to a whole block of ``INT8_BLOCK``."""
    return -(-vocab // INT8_GROUP), -(-width // INT8_BLOCK) * INT8_BLOCK * INT8_GROUP


@njit(parallel=True, cache=True, nogil=True)
def interleave_int8(table, lanes):
    """Write the int8 ``table`` (vocab, width) into ``lanes`` (``lanes_shape``): byte ``4 i + b`` of
    vector ``s`` of group ``g`` is ``table[16 g + i, 4 s + b]``; padding rows and values are 0."""
    vocab, width = table.shape
    steps = lanes.shape[1] // 64
    for g in prange(lanes.shape[0]):
        for s in range(steps):
            for i in range(INT8_GROUP):
                r = INT8_GROUP * g + i
                for b in range(4):
                    j = 4 * s + b
                    lanes[g, 64 * s + 4 * i + b] = table[r, j] if r < vocab and j < width else 0


@njit(parallel=True, cache=True, nogil=True)
def deinterleave_int8(lanes, table):
    """``interleave_int8`` backwards, into ``table`` (vocab, width)."""
    vocab, width = table.shape
    for r in prange(vocab):
        g = r // INT8_GROUP
        for j in range(width):
            table[r, j] = lanes[g, 64 * (j // 4) + 4 * (r - INT8_GROUP * g) + j % 4]


@njit(cache=True, nogil=True)
def rows_int8_lanes(lanes, row_scale, ids, out):
    """``rows_int8`` for a table in the lanes layout: ``out[i] = float32(row ids[i]) * row_scale[ids[i]]``."""
    for i in range(ids.shape[0]):
        g, lane_of_row = divmod(ids[i], INT8_GROUP)
        scale = row_scale[ids[i]]
        for j in range(out.shape[1]):
            out[i, j] = np.float32(lanes[g, 64 * (j // 4) + 4 * lane_of_row + j % 4]) * scale


@njit(**_ROW_KERNEL)
def _table_vector(lanes, g, b, s):
    """Flat index of vector ``s`` of block ``b`` of group ``g`` (4 values of 16 rows), its stream
    prefetched ahead."""
    at = g * lanes.shape[1] + 64 * (INT8_BLOCK // 4 * b + s)
    prefetch(lanes, at + LANES_PREFETCH_BYTES)
    return at


@njit(**_ROW_KERNEL)
def _block_step(isa, lanes, at, q, k, acc):
    """``acc`` plus 4 values of each of the 16 rows (the table's vector at flat ``at``) times the 4
    activations of ``q`` at flat ``k``, broadcast to every lane (exact: ``signed_dot``)."""
    x = splat_four_bytes(isa, q, k)
    return signed_dot(isa, load_bytes(isa, lanes, at), x, acc)


@njit(**_ROW_KERNEL)
def _scaled(isa, total, acc, block_scale, t, b):
    """``total + float(acc) * block_scale[t, b]`` in every lane: a block's exact sums, scaled once."""
    return scaled_add_floats(total, acc, splat_floats(isa, block_scale[t, b]))


@njit(**_CALLED_KERNEL)
def _emit_lanes(isa, total, t, g, row_scale, out):
    """Token ``t``'s logits of group ``g``: ``total`` (lane ``i``: row ``16 g + i``) times the row scales,
    one vector store, or lane by lane for the last group of a vocabulary not a multiple of 16;
    nothing for a padding token (``padded_tokens``)."""
    if t >= out.shape[0]:
        return
    vocab = out.shape[1]
    first = INT8_GROUP * g
    if first + INT8_GROUP <= vocab:
        store_vector(out, t * vocab + first, mul_floats(total, load_floats(isa, row_scale, first)))
    else:
        for i in range(vocab - first):
            out[t, first + i] = lane(total, i) * row_scale[first + i]


@njit(**_ROW_KERNEL)
def _four_block_steps(isa, lanes, at, q, k, width, a0, a1, a2, a3):
    """``_block_step`` for 4 tokens, ``width`` apart from flat ``k`` in ``q``, on one table vector."""
    return (_block_step(isa, lanes, at, q, k, a0), _block_step(isa, lanes, at, q, k + width, a1),
            _block_step(isa, lanes, at, q, k + 2 * width, a2), _block_step(isa, lanes, at, q, k + 3 * width, a3))


@njit(**_CALLED_KERNEL)
def _four_starts(isa, offsets, t, b):
    """The accumulators of tokens ``t .. t + 3`` for block ``b``: each lane at the token's ``offsets``."""
    return (splat_acc(isa, offsets[t, b]), splat_acc(isa, offsets[t + 1, b]), splat_acc(isa, offsets[t + 2, b]),
            splat_acc(isa, offsets[t + 3, b]))


@njit(**_CALLED_KERNEL)
def _four_scaled(isa, f0, f1, f2, f3, a0, a1, a2, a3, block_scale, t, b):
    """``_scaled`` for tokens ``t .. t + 3``."""
    return (_scaled(isa, f0, a0, block_scale, t, b), _scaled(isa, f1, a1, block_scale, t + 1, b),
            _scaled(isa, f2, a2, block_scale, t + 2, b), _scaled(isa, f3, a3, block_scale, t + 3, b))


@njit(**_CALLED_KERNEL)
def _emit_four(isa, f0, f1, f2, f3, t, g, row_scale, out):
    """``_emit_lanes`` for tokens ``t .. t + 3``."""
    _emit_lanes(isa, f0, t, g, row_scale, out)
    _emit_lanes(isa, f1, t + 1, g, row_scale, out)
    _emit_lanes(isa, f2, t + 2, g, row_scale, out)
    _emit_lanes(isa, f3, t + 3, g, row_scale, out)


@njit(**_CALLED_KERNEL)
def _lanes_tile8(isa, lanes, row_scale, q, offsets, block_scale, out, g, t):
    """Group ``g``'s logits of the 8 tokens from ``t``: each table vector loaded once for the 8."""
    width = q.shape[1]
    f0, f1, f2, f3 = zero_floats(isa), zero_floats(isa), zero_floats(isa), zero_floats(isa)
    f4, f5, f6, f7 = zero_floats(isa), zero_floats(isa), zero_floats(isa), zero_floats(isa)
    for b in range(width // INT8_BLOCK):
        a0, a1, a2, a3 = _four_starts(isa, offsets, t, b)
        a4, a5, a6, a7 = _four_starts(isa, offsets, t + 4, b)
        for s in range(INT8_BLOCK // 4):
            at = _table_vector(lanes, g, b, s)
            k = t * width + INT8_BLOCK * b + 4 * s
            a0, a1, a2, a3 = _four_block_steps(isa, lanes, at, q, k, width, a0, a1, a2, a3)
            a4, a5, a6, a7 = _four_block_steps(isa, lanes, at, q, k + 4 * width, width, a4, a5, a6, a7)
        f0, f1, f2, f3 = _four_scaled(isa, f0, f1, f2, f3, a0, a1, a2, a3, block_scale, t, b)
        f4, f5, f6, f7 = _four_scaled(isa, f4, f5, f6, f7, a4, a5, a6, a7, block_scale, t + 4, b)
    _emit_four(isa, f0, f1, f2, f3, t, g, row_scale, out)
    _emit_four(isa, f4, f5, f6, f7, t + 4, g, row_scale, out)


@njit(**_CALLED_KERNEL)
def _lanes_tile4(isa, lanes, row_scale, q, offsets, block_scale, out, g, t):
    """``_lanes_tile8`` for the 4 tokens from ``t``."""
    width = q.shape[1]
    f0, f1, f2, f3 = zero_floats(isa), zero_floats(isa), zero_floats(isa), zero_floats(isa)
    for b in range(width // INT8_BLOCK):
        a0, a1, a2, a3 = _four_starts(isa, offsets, t, b)
        for s in range(INT8_BLOCK // 4):
            a0, a1, a2, a3 = _four_block_steps(isa, lanes, _table_vector(lanes, g, b, s), q,
                                               t * width + INT8_BLOCK * b + 4 * s, width, a0, a1, a2, a3)
        f0, f1, f2, f3 = _four_scaled(isa, f0, f1, f2, f3, a0, a1, a2, a3, block_scale, t, b)
    _emit_four(isa, f0, f1, f2, f3, t, g, row_scale, out)


@njit(**_CALLED_KERNEL)
def _lanes_tile1(isa, lanes, row_scale, q, offsets, block_scale, out, g, t):
    """``_lanes_tile8`` for token ``t`` alone (one stream of the table, as decoding reads it); the same
    block sums, scaled and added in the same order, so the same bits."""
    width = q.shape[1]
    f0 = zero_floats(isa)
    for b in range(width // INT8_BLOCK):
        a0 = splat_acc(isa, offsets[t, b])
        for s in range(INT8_BLOCK // 4):
            a0 = _block_step(isa, lanes, _table_vector(lanes, g, b, s), q, t * width + INT8_BLOCK * b + 4 * s, a0)
        f0 = _scaled(isa, f0, a0, block_scale, t, b)
    _emit_lanes(isa, f0, t, g, row_scale, out)


def padded_tokens(n: int) -> int:
    """Rows of ``logits_int8_lanes``'s scratch for ``n`` tokens: 2-3 tokens go as one tile of 4 and 5-7 as
    one of 8, the rest as they are (tiles of 8, then 4, then one by one).

    A group's later tiles read its rows from L2 while DRAM waits, so the tokens left over after
    the tiles cost whole passes: the head took 19.2 ms for 7 tokens against 12.7 for 8 (NOTES.md).
    Padding tokens are zeros, computed in the tile and never written out.
    """
    return (4 if n < 4 else 8) if 1 < n < 8 and n % 4 else n


@njit(**_KERNEL)
def logits_int8_lanes(isa, lanes, row_scale, h, q, block_scale, offsets, out):
    """``logits_int8`` for a table in the lanes layout (``interleave_int8``), on AVX-512 VNNI.

    ``q``: int8 ``(padded_tokens(n), padded width)`` (``lanes.shape[1] // 16``), ``block_scale``
    and ``offsets`` (int32) ``(padded_tokens(n), padded width // INT8_BLOCK)``: scratch (any
    rows from ``n`` on are zeroed here: padding). ``h`` is quantized as ``logits_int8`` does it;
    each lane of a block's accumulator starts from ``-128`` times the block's sum of ``q``
    (``offsets``), so the ``signed_dot`` steps leave the exact block sum. Tokens go in tiles of
    8, then one of 4, then one by one; a token's logits are the same bits in any (and for any
    thread count: each group of 16 rows is one ``prange`` iteration).
    """
    n, width = h.shape
    tokens = q.shape[0]
    for t in range(n):
        quantize_blocks(h, t, q, block_scale, INT8_BLOCK)
        q[t, width:] = 0
        for b in range(offsets.shape[1]):
            total = 0
            for j in range(INT8_BLOCK * b, INT8_BLOCK * (b + 1)):
                total += q[t, j]
            offsets[t, b] = -128 * total
    q[n:] = 0
    block_scale[n:] = 0
    offsets[n:] = 0
    for g in prange(lanes.shape[0]):
        t = 0
        while t + 8 <= tokens:
            _lanes_tile8(isa, lanes, row_scale, q, offsets, block_scale, out, g, t)
            t += 8
        if t + 4 <= tokens:
            _lanes_tile4(isa, lanes, row_scale, q, offsets, block_scale, out, g, t)
            t += 4
        while t < tokens:
            _lanes_tile1(isa, lanes, row_scale, q, offsets, block_scale, out, g, t)
            t += 1

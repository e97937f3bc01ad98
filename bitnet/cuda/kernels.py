"""numba-cuda kernels for ternary matmul: int8 activation quantization, GEMV and GEMM.

Importing this module imports ``numba.cuda``; ``bitnet.cuda.backend`` does so only once it
knows CUDA (or the simulator) is usable. Kernels trust their caller for shapes and dtypes.

Layouts (made by ``bitnet.cuda.weights`` and ``bitnet.cuda.backend``)
---------------------------------------------------------------------
* **weights**: the ``i2`` payload, unchanged, read as little-endian uint32 words,
  ``(m, kpad / 16)``. Word ``t`` of a row is bytes ``4t .. 4t+3``; with block ``b = t // 16``
  and ``j = 4 (t % 16)``, ``(word >> 2i) & 0x03030303`` holds ``code + 1`` (0, 1 or 2) of
  columns ``256 b + 64 i + j + (0, 1, 2, 3)``, one per byte: four *consecutive* columns, so
  one shift and one mask decode four weights in a register.
* **activations**: int8 codes packed four to an int32 word (little-endian), ``kpad / 4``
  words per token, zero past ``k``. The weights' sub-word ``i`` of word ``t`` pairs with
  activation word ``64 b + 16 i + t % 16``.
* **dot product**: ``dp4a(qword, code_word, acc)`` adds four byte products at once, giving
  ``sum q (code + 1)``; subtracting the token's ``sum q`` (made while quantizing) leaves the
  exact ``sum q code``. Padding columns have ``q = 0``, so they add nothing.

Reductions: a warp sums its lanes with ``shfl_down_sync`` or an ``shfl_xor_sync`` butterfly;
blocks reduce through 8 words of shared memory. Every lane of a warp (every thread of a
block for block reductions) makes the same reduction calls, which keeps the kernels valid
under the simulator too (``bitnet.cuda.simulator`` supplies the shuffles there).

Kernels: ``quantize_rows`` (one block per token), ``quantize_gemv`` (decode: one launch,
quantization fused), ``gemm`` / ``gemm_int`` (prefill and ``matmul_int``, after
``quantize_rows``). Measurements and what was tried: ``benchmarks/NOTES.md``.

Output scaling is ``float32(acc) / a * s`` in float32 with IEEE division, exactly what the
CPU kernels of ``bitnet.ops.matmul`` compute.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, int32

WARP = 32
THREADS = 256  # threads per block in every kernel: 8 warps
WARPS = THREADS // WARP
FULL_MASK = 0xFFFFFFFF
CODE_MASK = 0x03030303  # the low 2 bits of each byte
WORDS_PER_BLOCK = 16  # uint32 words in one 64-byte i2 block of 256 weights
TOKEN_TILE = 8  # tokens sharing each weight load in the GEMM kernel
GEMM_ROWS = 4  # rows a warp computes together in the GEMM: each activation load serves 4 rows
TILE_ACCUMULATORS = GEMM_ROWS * TOKEN_TILE  # int32 accumulators per lane in the GEMM
LANE_WORDS = 8  # weight words per lane per GEMV step: a step covers 8 * 32 * 16 = 4096 columns
CHUNK_WORDS = LANE_WORDS * WARP
HELD_ACTIVATIONS = 4 * LANE_WORDS  # activation words a GEMV lane keeps in registers

INT8_LEVELS = np.float32(127.0)
ACTIVATION_ABSMAX_MIN = np.float32(1e-5)
FLOAT32_MAX = np.float32(3.4028235e38)
NAN32 = np.float32(np.nan)

SIMULATOR = bool(config.ENABLE_CUDASIM)
# GEMV blocks resident per multiprocessor: registers are capped so that this many fit
# (65536 / (256 * 2) = 128 per thread, no spills); the backend sizes the grid to fill them once.
GEMV_BLOCKS_PER_SM = 2
# Dynamic shared memory's element type: the simulator sizes it with ``dtype.itemsize``.
SHARED_INT32 = np.dtype(np.int32) if SIMULATOR else int32

if SIMULATOR:
    from . import simulator

    simulator.install()

    def dp4a(qword, code_word, acc):
        """``acc + sum_i signed_byte_i(qword) * byte_i(code_word)``, in Python for the simulator."""
        qword, code_word = int(qword), int(code_word)
        for i in range(4):
            q = (qword >> (8 * i)) & 0xFF
            q -= (q & 0x80) << 1  # sign-extend the byte
            acc += q * ((code_word >> (8 * i)) & 0xFF)
        return acc

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def dp4a(typingctx, qword, code_word, acc):
        """PTX ``dp4a.s32.u32``: ``acc + sum_i signed_byte_i(qword) * unsigned_byte_i(code_word)``."""
        signature = types.int32(types.int32, types.uint32, types.int32)

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            asm = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), "dp4a.s32.u32 $0, $1, $2, $3;", "=r,r,r,r")
            return builder.call(asm, args)

        return signature, codegen


@cuda.jit(device=True)
def warp_sum(value):
    """Sum of ``value`` over the 32 lanes, returned to lane 0."""
    offset = WARP // 2
    while offset > 0:
        value += cuda.shfl_down_sync(FULL_MASK, value, offset)
        offset //= 2
    return value


@cuda.jit(device=True)
def block_max(value, scratch):
    """Max of ``value`` over the block, returned to every thread (``scratch``: WARPS floats)."""
    offset = WARP // 2
    while offset > 0:
        value = max(value, cuda.shfl_down_sync(FULL_MASK, value, offset))
        offset //= 2
    if cuda.threadIdx.x % WARP == 0:
        scratch[cuda.threadIdx.x // WARP] = value
    cuda.syncthreads()
    result = scratch[0]
    for w in range(1, cuda.blockDim.x // WARP):
        result = max(result, scratch[w])
    cuda.syncthreads()  # scratch may be reused right after
    return result


@cuda.jit(device=True)
def block_sum(value, scratch):
    """Sum of ``value`` over the block, returned to every thread (``scratch``: WARPS ints)."""
    value = warp_sum(value)
    if cuda.threadIdx.x % WARP == 0:
        scratch[cuda.threadIdx.x // WARP] = value
    cuda.syncthreads()
    result = scratch[0]
    for w in range(1, cuda.blockDim.x // WARP):
        result += scratch[w]
    cuda.syncthreads()
    return result


@cuda.jit(device=True)
def load4(x, k, u):
    """``x[4u .. 4u+3]`` (the values of activation word ``u``), 0 past ``k``."""
    zero = np.float32(0.0)
    j = 4 * u
    return (
        x[j] if j < k else zero,
        x[j + 1] if j + 1 < k else zero,
        x[j + 2] if j + 2 < k else zero,
        x[j + 3] if j + 3 < k else zero,
    )


@cuda.jit(device=True)
def absmax4(values, amax, finite):
    """``amax`` and the ``finite`` flag updated with four values."""
    for v in values:
        v = abs(v)
        if not (v <= FLOAT32_MAX):
            finite = 0
        amax = max(amax, v)
    return amax, finite


@cuda.jit(device=True)
def pack4(values, a):
    """The int8 codes of four values at scale ``a``, packed into an int32 (little-endian), and their sum."""
    v0, v1, v2, v3 = values
    q0 = min(max(round(v0 * a), -128), 127)
    q1 = min(max(round(v1 * a), -128), 127)
    q2 = min(max(round(v2 * a), -128), 127)
    q3 = min(max(round(v3 * a), -128), 127)
    word = (q0 & 0xFF) | ((q1 & 0xFF) << 8) | ((q2 & 0xFF) << 16) | ((q3 & 0xFF) << 24)
    return word - ((word >> 31) << 32), q0 + q1 + q2 + q3  # the bit pattern as a signed int32


@cuda.jit(device=True)
def quantize_token(x, k, words, amax_scratch, sum_scratch):
    """Quantize ``x[:k]`` (one token) into int8 codes packed in ``words``; the whole block works on it.

    Returns ``(a, qsum)``: the float32 scale ``127 / max(max|x|, 1e-5)`` (NaN, with all codes 0,
    if ``x`` holds NaN or Inf) and the int32 sum of the codes. Bit for bit the formula of
    ``bitnet.kernels.quantize.quantize_row``: float32 product, round half to even.

    Each thread loads its first four words (16 values: all of ``x`` up to 4096 columns at 256
    threads) at once and keeps them in registers across the block reduction, so a token
    costs one round trip to memory, not one per loop step and pass.
    """
    tid = cuda.threadIdx.x
    stride = cuda.blockDim.x
    nwords = words.shape[0]
    held0 = load4(x, k, tid)
    held1 = load4(x, k, tid + stride)
    held2 = load4(x, k, tid + 2 * stride)
    held3 = load4(x, k, tid + 3 * stride)
    amax, finite = absmax4(held0, np.float32(0.0), 1)
    amax, finite = absmax4(held1, amax, finite)
    amax, finite = absmax4(held2, amax, finite)
    amax, finite = absmax4(held3, amax, finite)
    for u in range(tid + 4 * stride, nwords, stride):  # rows past 4 words per thread
        amax, finite = absmax4(load4(x, k, u), amax, finite)
    all_finite = cuda.syncthreads_and(finite)
    amax = block_max(amax, amax_scratch)
    if not all_finite:
        for u in range(tid, nwords, stride):
            words[u] = 0
        return NAN32, block_sum(int32(0), sum_scratch)
    a = INT8_LEVELS / max(amax, ACTIVATION_ABSMAX_MIN)
    qsum = 0
    if tid < nwords:
        words[tid], s = pack4(held0, a)
        qsum += s
    if tid + stride < nwords:
        words[tid + stride], s = pack4(held1, a)
        qsum += s
    if tid + 2 * stride < nwords:
        words[tid + 2 * stride], s = pack4(held2, a)
        qsum += s
    if tid + 3 * stride < nwords:
        words[tid + 3 * stride], s = pack4(held3, a)
        qsum += s
    for u in range(tid + 4 * stride, nwords, stride):
        words[u], s = pack4(load4(x, k, u), a)
        qsum += s
    return a, block_sum(int32(qsum), sum_scratch)


@cuda.jit(device=True)
def activation_base(t):
    """Index of the activation word that pairs with sub-word 0 of weight word ``t`` (see the layout)."""
    return (t // WORDS_PER_BLOCK) * 64 + t % WORDS_PER_BLOCK


@cuda.jit(device=True)
def word_dot(word, base, qwords, acc):
    """``acc + sum q (code + 1)`` over the 16 weights of a word; ``base = activation_base(t)``."""
    acc = dp4a(qwords[base], word & CODE_MASK, acc)
    acc = dp4a(qwords[base + 16], (word >> 2) & CODE_MASK, acc)
    acc = dp4a(qwords[base + 32], (word >> 4) & CODE_MASK, acc)
    return dp4a(qwords[base + 48], (word >> 6) & CODE_MASK, acc)


@cuda.jit(device=True)
def load_chunk(weights, row, first):
    """Words ``first + 32 j`` (j = 0..7) of weight row ``row``; 0 past the row or past the last row.

    Eight independent loads per lane are in flight together, instead of one per loop step.
    """
    rows, words = weights.shape
    zero = np.uint32(0)
    ok = row < rows
    return (
        weights[row, first] if ok and first < words else zero,
        weights[row, first + WARP] if ok and first + WARP < words else zero,
        weights[row, first + 2 * WARP] if ok and first + 2 * WARP < words else zero,
        weights[row, first + 3 * WARP] if ok and first + 3 * WARP < words else zero,
        weights[row, first + 4 * WARP] if ok and first + 4 * WARP < words else zero,
        weights[row, first + 5 * WARP] if ok and first + 5 * WARP < words else zero,
        weights[row, first + 6 * WARP] if ok and first + 6 * WARP < words else zero,
        weights[row, first + 7 * WARP] if ok and first + 7 * WARP < words else zero,
    )


@cuda.jit(device=True)
def chunk_dot(chunk, first, words, qwords, acc):
    """``acc + sum q (code + 1)`` over the words of ``chunk`` (from ``load_chunk(..., first)``).

    Written out word by word: a loop would index the tuple with a variable.
    """
    w0, w1, w2, w3, w4, w5, w6, w7 = chunk
    base = activation_base(first)  # word first + 32 j pairs with activations base + 128 j
    if first < words:
        acc = word_dot(w0, base, qwords, acc)
    if first + WARP < words:
        acc = word_dot(w1, base + 128, qwords, acc)
    if first + 2 * WARP < words:
        acc = word_dot(w2, base + 2 * 128, qwords, acc)
    if first + 3 * WARP < words:
        acc = word_dot(w3, base + 3 * 128, qwords, acc)
    if first + 4 * WARP < words:
        acc = word_dot(w4, base + 4 * 128, qwords, acc)
    if first + 5 * WARP < words:
        acc = word_dot(w5, base + 5 * 128, qwords, acc)
    if first + 6 * WARP < words:
        acc = word_dot(w6, base + 6 * 128, qwords, acc)
    if first + 7 * WARP < words:
        acc = word_dot(w7, base + 7 * 128, qwords, acc)
    return acc


@cuda.jit(device=True)
def hold_activations(qwords, lane, held):
    """Fill ``held[4 j + s]`` with the activation word that sub-word ``s`` of weight word
    ``lane + 32 j`` pairs with (j < 8, s < 4; 0 past the end): a lane's activations for the
    first 4096 columns of every row, loaded once and kept in registers."""
    base = activation_base(lane)
    for j in range(LANE_WORDS):
        for sub in range(4):
            u = base + 128 * j + 16 * sub
            held[4 * j + sub] = qwords[u] if u < qwords.shape[0] else 0


@cuda.jit(device=True)
def held_word_dot(word, held, j, acc):
    """``word_dot`` for word ``j`` of a chunk, with the activations from ``hold_activations``."""
    acc = dp4a(held[4 * j], word & CODE_MASK, acc)
    acc = dp4a(held[4 * j + 1], (word >> 2) & CODE_MASK, acc)
    acc = dp4a(held[4 * j + 2], (word >> 4) & CODE_MASK, acc)
    return dp4a(held[4 * j + 3], (word >> 6) & CODE_MASK, acc)


@cuda.jit(device=True)
def held_chunk_dot(chunk, held, acc):
    """``chunk_dot`` of the first chunk of a row, from registers only. Words past the row are
    0 (``load_chunk``), and a 0 word adds nothing (``code + 1 = 0``), so no bounds checks."""
    w0, w1, w2, w3, w4, w5, w6, w7 = chunk
    acc = held_word_dot(w0, held, 0, acc)
    acc = held_word_dot(w1, held, 1, acc)
    acc = held_word_dot(w2, held, 2, acc)
    acc = held_word_dot(w3, held, 3, acc)
    acc = held_word_dot(w4, held, 4, acc)
    acc = held_word_dot(w5, held, 5, acc)
    acc = held_word_dot(w6, held, 6, acc)
    return held_word_dot(w7, held, 7, acc)


@cuda.jit(device=True)
def warp_allsum(value):
    """Sum of ``value`` over the 32 lanes, returned to every lane (butterfly of xor shuffles)."""
    offset = WARP // 2
    while offset > 0:
        value += cuda.shfl_xor_sync(FULL_MASK, value, offset)
        offset //= 2
    return value


@cuda.jit(device=True)
def scaled(acc, a, s):
    """``float32(acc) / a * s``, all in float32, as the CPU kernels compute it."""
    return np.float32(acc) / a * s


@cuda.jit
def quantize_rows(x, k, qwords, qsums, scales):
    """One block per token: ``qwords[n]`` (packed codes), ``qsums[n]`` and ``scales[n]`` of ``x[n, :k]``."""
    amax_scratch = cuda.shared.array(WARPS, np.float32)
    sum_scratch = cuda.shared.array(WARPS, np.int32)
    token = cuda.blockIdx.x
    a, qsum = quantize_token(x[token], k, qwords[token], amax_scratch, sum_scratch)
    if cuda.threadIdx.x == 0:
        scales[token] = a
        qsums[token] = qsum


def quantize_gemv_body(x, k, weights, wscale, rows_per_warp, out):
    """Decode path, one launch: each block quantizes token ``blockIdx.y`` into shared memory
    (``kpad`` bytes of dynamic shared memory), then each warp computes ``rows_per_warp`` outputs.

    The launch has about as many blocks as fit on the GPU at once, so each block pays for the
    quantization once and then streams many rows. Each warp starts loading its first row
    before quantizing, and the next row's first 4096 columns before working on the current
    one. Results are scaled and stored 32 rows at a time, one row per lane.
    """
    qwords = cuda.shared.array(0, SHARED_INT32)
    amax_scratch = cuda.shared.array(WARPS, np.float32)
    sum_scratch = cuda.shared.array(WARPS, np.int32)
    held = cuda.local.array(HELD_ACTIVATIONS, np.int32)
    rows, words = weights.shape
    lane = cuda.threadIdx.x % WARP
    warps = cuda.blockDim.x // WARP
    first = cuda.blockIdx.x * warps * rows_per_warp + cuda.threadIdx.x // WARP
    token = cuda.blockIdx.y
    chunk = load_chunk(weights, first, lane)
    a, qsum = quantize_token(x[token], k, qwords, amax_scratch, sum_scratch)
    hold_activations(qwords, lane, held)
    mine = int32(0)  # lane l keeps the sum of the warp's row l (mod 32) until they are written
    for i in range(rows_per_warp):
        row = first + i * warps
        following = load_chunk(weights, row + warps if i + 1 < rows_per_warp else rows, lane)
        acc = held_chunk_dot(chunk, held, int32(0))
        for start in range(CHUNK_WORDS + lane, words, CHUNK_WORDS):  # rows past 4096 columns
            acc = chunk_dot(load_chunk(weights, row, start), start, words, qwords, acc)
        total = warp_allsum(acc)
        if lane == i % WARP:
            mine = total
        if i % WARP == WARP - 1 or i == rows_per_warp - 1:
            # Scale and store up to 32 rows at once, one per lane, instead of one lane per row.
            own = first + (i - i % WARP + lane) * warps
            if lane <= i % WARP and own < rows:
                out[token, own] = scaled(mine - qsum, a, wscale[own])
        chunk = following


def make_quantize_gemv(blocks_per_sm: int):
    """``quantize_gemv_body`` compiled with registers capped for ``blocks_per_sm`` resident blocks."""
    return cuda.jit(**({} if SIMULATOR else {"launch_bounds": (THREADS, blocks_per_sm)}))(quantize_gemv_body)


quantize_gemv = make_quantize_gemv(GEMV_BLOCKS_PER_SM)


@cuda.jit(device=True)
def row_word(weights, row, t):
    """Word ``t`` of weight row ``row``, 0 for a row past the matrix."""
    return weights[row, t] if row < weights.shape[0] else np.uint32(0)


@cuda.jit(device=True)
def tile_accumulate(weights, first_row, qwords, first_token, lane, acc):
    """``acc[r * TOKEN_TILE + i]`` = this lane's part of ``sum q (code + 1)`` for row
    ``first_row + r`` (r < GEMM_ROWS) and token ``first_token + i`` (i < TOKEN_TILE).

    Each weight word is loaded and decoded once for the tile's tokens, and each activation
    word once for its GEMM_ROWS rows. Loops have constant trip counts so that they unroll
    and ``acc`` lives in registers.
    """
    ntokens = qwords.shape[0] - first_token
    for i in range(TILE_ACCUMULATORS):
        acc[i] = 0
    for t in range(lane, weights.shape[1], WARP):
        base = activation_base(t)
        w0 = row_word(weights, first_row, t)
        w1 = row_word(weights, first_row + 1, t)
        w2 = row_word(weights, first_row + 2, t)
        w3 = row_word(weights, first_row + 3, t)
        for sub in range(4):
            c0 = (w0 >> (2 * sub)) & CODE_MASK
            c1 = (w1 >> (2 * sub)) & CODE_MASK
            c2 = (w2 >> (2 * sub)) & CODE_MASK
            c3 = (w3 >> (2 * sub)) & CODE_MASK
            for i in range(TOKEN_TILE):
                if i < ntokens:
                    q = qwords[first_token + i, base + 16 * sub]
                    acc[i] = dp4a(q, c0, acc[i])
                    acc[TOKEN_TILE + i] = dp4a(q, c1, acc[TOKEN_TILE + i])
                    acc[2 * TOKEN_TILE + i] = dp4a(q, c2, acc[2 * TOKEN_TILE + i])
                    acc[3 * TOKEN_TILE + i] = dp4a(q, c3, acc[3 * TOKEN_TILE + i])


@cuda.jit(device=True)
def gemm_tile(qwords, weights, acc):
    """Accumulate this warp's tile; returns (first row, first token, lane)."""
    lane = cuda.threadIdx.x % WARP
    first_row = (cuda.blockIdx.x * (cuda.blockDim.x // WARP) + cuda.threadIdx.x // WARP) * GEMM_ROWS
    first_token = cuda.blockIdx.y * TOKEN_TILE
    tile_accumulate(weights, first_row, qwords, first_token, lane, acc)
    return first_row, first_token, lane


@cuda.jit
def gemm(qwords, qsums, scales, weights, wscale, out):
    """Prefill path: each warp computes GEMM_ROWS rows x TOKEN_TILE tokens (grid: row blocks x
    token tiles); activations come quantized by ``quantize_rows``."""
    acc = cuda.local.array(TILE_ACCUMULATORS, np.int32)
    first_row, first_token, lane = gemm_tile(qwords, weights, acc)
    for r in range(GEMM_ROWS):
        for i in range(TOKEN_TILE):
            total = warp_sum(acc[r * TOKEN_TILE + i])
            row, token = first_row + r, first_token + i
            if lane == 0 and row < out.shape[1] and token < out.shape[0]:
                out[token, row] = scaled(total - qsums[token], scales[token], wscale[row])


@cuda.jit
def gemm_int(qwords, qsums, weights, out):
    """``gemm`` without the scaling: exact int32 ``q @ codes.T`` (for ``matmul_int``)."""
    acc = cuda.local.array(TILE_ACCUMULATORS, np.int32)
    first_row, first_token, lane = gemm_tile(qwords, weights, acc)
    for r in range(GEMM_ROWS):
        for i in range(TOKEN_TILE):
            total = warp_sum(acc[r * TOKEN_TILE + i])
            row, token = first_row + r, first_token + i
            if lane == 0 and row < out.shape[1] and token < out.shape[0]:
                out[token, row] = total - qsums[token]


def grid_rows(m: int, rows_per_warp: int) -> int:
    """Blocks along the output rows for ``m`` rows at ``rows_per_warp`` rows per warp."""
    return math.ceil(m / (WARPS * rows_per_warp))

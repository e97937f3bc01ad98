"""Ternary matmul: int8 activations times packed ternary weights, exact in int32.

The weights come in the layout of the path (``WEIGHT_FORMATS``): ``i2x16`` (16 rows in the
vector lanes) on AVX-512 VNNI, ``i2`` on every other path. Which inner loops run is decided at
compile time by the ISA marker (``simd.MARKERS``):

* ``ternary_lanes``: on AVX-512 VNNI, every batch size, on ``i2x16`` weights;
* ``ternary_simd``: the GEMV (two rows at a time) and GEMM (2 rows x 8 tokens) loops on
  ``i2`` for AVX-VNNI, AVX2 and the AMX path's small batches, driven by ``ternary_matmul``;
* ``ternary_portable``: the same loops in plain Numba, for any CPU;
* ``ternary_amx``: all tokens of a batch of ``AMX_MIN_TOKENS`` or more on Intel AMX tiles.

The ``i2`` block layout and the output step are in ``ternary_blocks``. The entry point of
each path (``ENTRY_POINTS``) is made from one definition (``_entry_point``) with its marker fixed.

Work is split over output rows with ``prange``; every output value is computed by one task
in a fixed order, so results are bit-identical for any thread count. A task pairs row ``r``
with row ``r + half`` of its range in the GEMV loop, so each thread reads two streams of
weights at once, which DRAM serves ~10% faster than one stream of adjacent rows. The GEMM
k axis is cut into chunks so that a tile's activations stay in L1 while ``GEMM_ROWS`` rows
pass over them.

Scratch: the kernels allocate nothing. The caller passes the buffers ``scratch_shapes`` lists
(``bitnet.ops`` keeps them per shape, so repeated calls reuse them), one set per thread slot.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange
from numba.extending import overload

from . import amx
from .quantize import quantize_padded, quantize_row
from .simd import MARKERS
from .ternary_amx import gemm_amx
from .ternary_blocks import (
    AMX_MAX_K,
    AMX_MIN_TOKENS,
    AMX_ROWS,
    AMX_TOKENS,
    BLOCK_BYTES,
    KERNEL,
    TILE_ROWS,
    TILE_TOKENS,
    emit,
    emit_rows,
    vnni_activations,
)
from .ternary_lanes import lanes_matmul
from .ternary_portable import row_pair_portable, tile_portable
from .ternary_simd import row_pair_simd, tile_simd

K_CHUNK_BLOCKS = 12  # GEMM k-chunk: 8 tokens x 12 x 256 bytes of activations = 24 KB, fits L1
PARALLEL_TASKS = 32  # tasks the rows are cut into: even shares for 1, 2, 4, 8, 16 or 32 threads
GEMM_ROWS = 32  # rows a GEMM pass takes over one L1-resident activation tile (a multiple of TILE_ROWS)

# Scratch sets, one per thread of Numba's pool (bn.set_num_threads cannot go past its size), but no
# more than there are tasks: a slot runs its tasks one after the other on its own set.
SCRATCH_SLOTS = min(PARALLEL_TASKS, numba.config.NUMBA_NUM_THREADS)

# The scratch a path does not use, as constants (``_full_scratch``): out of the entry points'
# arguments, they save ~0.5 us of dispatch a call. Per-slot ones have PARALLEL_TASKS rows (as many as any slot count;
# a constant cannot follow NUMBA_NUM_THREADS, as cached code keeps the value it was compiled with).
_NO_LANES = np.zeros((PARALLEL_TASKS, 0), np.int16)
_NO_WIDE = np.zeros((0, 0), np.int16)
_NO_CODES = np.zeros((PARALLEL_TASKS, 0, 0), np.uint8)
_NO_TILE_SUMS = np.zeros((PARALLEL_TASKS, 0, 0), np.int32)
_NO_TILES = np.zeros((0, 0, 0), np.int32)
_NO_GEMM_SUMS = np.zeros((PARALLEL_TASKS, 0, 0), np.int64)
_LANES_PATH = "avx512vnni"  # the path that reads ``i2x16`` (``ternary_lanes``)
WEIGHT_FORMATS = {name: "i2x16" if name == _LANES_PATH else "i2" for name in MARKERS}
"""The packing format each path's kernel reads."""


def _fill_tiles(isa, q, tiles):
    """``vnni_activations`` on the amx path; compiled to nothing elsewhere (``tiles`` is empty there)."""


@overload(_fill_tiles, jit_options=KERNEL)
def _fill_tiles_for(isa, q, tiles):
    if isa.isa == "amx":
        return lambda isa, q, tiles: vnni_activations(q, tiles)
    return lambda isa, q, tiles: None


def _gemm_tiles(isa, w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """``gemm_amx`` on the amx path; compiled to nothing elsewhere."""


@overload(_gemm_tiles, jit_options=KERNEL)
def _gemm_tiles_for(isa, w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc, out,
                    as_float):
    if isa.isa == "amx":
        return (lambda isa, w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc, out,
                as_float: gemm_amx(w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc,
                                    out, as_float))
    return (lambda isa, w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc, out,
            as_float: None)


# --- one generic driver, specialised per instruction set at compile time -----------------------


def _row_pair(isa, w, r0, r1, q, t, lanes):
    """Compile-time dispatch to the GEMV inner loop of ``isa`` (see the overload below)."""


def _tile(isa, w, r0, r1, q, t, b0, b1, lanes, sums, i):
    """Compile-time dispatch to the GEMM inner loop of ``isa``."""


@overload(_row_pair, jit_options=KERNEL)
def _row_pair_for(isa, w, r0, r1, q, t, lanes):
    if isa.isa == "portable":

        def portable(isa, w, r0, r1, q, t, lanes):
            return row_pair_portable(w, r0, r1, q, t, 0, w.shape[1] // BLOCK_BYTES, lanes)

        return portable
    return lambda isa, w, r0, r1, q, t, lanes: row_pair_simd(isa, w, r0, r1, q, t)


@overload(_tile, jit_options=KERNEL)
def _tile_for(isa, w, r0, r1, q, t, b0, b1, lanes, sums, i):
    if isa.isa == "portable":
        return lambda isa, w, r0, r1, q, t, b0, b1, lanes, sums, i: tile_portable(w, r0, r1, q, t, b0, b1, lanes,
                                                                                 sums, i)
    return lambda isa, w, r0, r1, q, t, b0, b1, lanes, sums, i: tile_simd(isa, w, r0, r1, q, t, b0, b1, sums, i)


def _activations_for(isa, q, wide):
    """``q`` as the inner loops of ``isa`` read it: int8 for SIMD, copied into int16 ``wide`` for portable."""


@overload(_activations_for, jit_options=KERNEL)
def _activations_for_impl(isa, q, wide):
    if isa.isa == "portable":  # widen each activation once per call, not once per weight row: 12% faster

        def widened(isa, q, wide):
            for t in range(q.shape[0]):
                for j in range(q.shape[1]):
                    wide[t, j] = q[t, j]
            return wide

        return widened
    return lambda isa, q, wide: q


def _on_tiles(path: str, n: int, k_padded: int) -> bool:
    """Whether ``n`` tokens go through the AMX tiles (``_gemm_tiles``) rather than the GEMM tiles and
    GEMV: on the amx path from ``AMX_MIN_TOKENS`` tokens, while the int32 tile sums are exact."""
    return path == "amx" and n >= AMX_MIN_TOKENS and k_padded <= AMX_MAX_K


def scratch_shapes(path: str, n: int, k_padded: int) -> tuple[tuple[tuple[int, ...], type], ...]:
    """Shapes and dtypes of the scratch arrays the entry point of ``path`` takes, in argument order.

    Parameters
    ----------
    path : kernel path name (a key of ``ENTRY_POINTS``).
    n : number of tokens.
    k_padded : padded features, ``256 nb``.

    Returns
    -------
    tuple of ``(shape, dtype)``: none on avx512vnni (``ternary_lanes`` needs no scratch);
    ``gemm_sums`` on every other path, then ``lanes`` and ``wide`` on the portable path,
    ``row_codes``, ``tile_sums`` and ``tiles`` on the amx path (see ``ternary_matmul``); those
    this call does not use have no elements. The shapes also say which loop each token takes:
    the AMX tiles (``_on_tiles``) when ``tiles`` has elements, else GEMM tiles for the first
    ``gemm_sums.shape[1]`` tokens, the GEMV loop for the rest. The per-task arrays have
    ``SCRATCH_SLOTS`` in front, one for each thread slot.
    """
    if path == _LANES_PATH:
        return ()
    on_tiles = _on_tiles(path, n, k_padded)
    shapes = (((SCRATCH_SLOTS, 0 if on_tiles else n - n % TILE_TOKENS, GEMM_ROWS), np.int64),)
    if path == "portable":
        shapes += (((SCRATCH_SLOTS, BLOCK_BYTES), np.int16), ((n, k_padded), np.int16))
    elif path == "amx":
        rows, k_padded, sums = (AMX_ROWS, k_padded, (AMX_ROWS, AMX_TOKENS)) if on_tiles else (0, 0, (0, 0))
        shapes += (
            ((SCRATCH_SLOTS, rows, k_padded), np.uint8),
            ((SCRATCH_SLOTS, *sums), np.int32),
            ((k_padded // amx.TILE_BYTES, amx.TILE_ROWS, -(-n // AMX_TOKENS) * AMX_TOKENS if on_tiles else 0),
             np.int32),
        )
    return shapes


@njit(**KERNEL)
def _gemm_rows(isa, w, first_row, rows, q, tokens, sums, lanes):
    """``rows`` rows from ``first_row`` x the first ``tokens`` tokens (a multiple of 8) into ``sums``.

    Loop order keeps both operands close: for each tile of 8 tokens and each chunk of at
    most ``K_CHUNK_BLOCKS`` blocks, the tile's activations (8 x 3 KB) stay in L1 while every
    row pair of the task passes over them; ``sums[t, i]`` collects row ``first_row + i``
    (token-major, so that the output step runs over adjacent rows in vectors).
    """
    nb = w.shape[1] // BLOCK_BYTES
    m = w.shape[0]
    chunks = (nb + K_CHUNK_BLOCKS - 1) // K_CHUNK_BLOCKS
    per_chunk = (nb + chunks - 1) // chunks
    sums[:tokens, :rows] = 0
    for t in range(0, tokens, TILE_TOKENS):
        for b0 in range(0, nb, per_chunk):
            b1 = min(nb, b0 + per_chunk)
            for i in range(0, rows, TILE_ROWS):
                r0 = first_row + i
                _tile(isa, w, r0, min(r0 + 1, m - 1), q, t, b0, b1, lanes, sums, i)


@njit(parallel=True, **KERNEL)
def ternary_matmul(isa, w, q, q_sum, act_scale, scale, scale_step, acc, out, as_float, gemm_sums, lanes, row_codes,
                   tile_sums, tiles):
    """``q @ (c - 1).T`` for i2 data ``w`` (m, 64 nb) and padded int8 ``q`` (n, 256 nb).

    Writes ``acc`` (int32, (n, m)) or, with ``as_float``, ``out`` (float32, (n, m)) =
    ``acc / act_scale[t] * scale[r * scale_step]`` (``scale_step`` 0 for one scale per tensor).
    The scratch arrays are those of ``scratch_shapes``, whose shapes pick the loops: when
    ``tiles`` (``q`` in VNNI layout, ``vnni_activations``) is not empty, every token goes through
    the AMX tiles; otherwise the first ``gemm_sums.shape[1]`` tokens go through the GEMM tiles.

    The rows are cut into ``PARALLEL_TASKS`` tasks (fewer for small ``m``) of an even number of
    rows, dealt out in even runs to ``SCRATCH_SLOTS`` slots (one per thread of Numba's pool, as
    ``prange`` deals out the slots to the threads in use); a slot runs its tasks one after the
    other on ``gemm_sums[slot]``, ``lanes[slot]``, ``row_codes[slot]`` and ``tile_sums[slot]``,
    and which slot or task computes a row never changes its value.
    Tokens go in tiles of ``TILE_TOKENS`` through the GEMM loop, ``GEMM_ROWS`` rows at a time;
    the rest (and ``n == 1``) through the GEMV loop, which takes row ``r`` of the task's first
    half with row ``r + half`` (an odd middle row alone) and rereads the pair from L1 for each token.
    """
    m = w.shape[0]
    n = q.shape[0]
    on_tiles = tiles.shape[0] > 0
    tiled = n if on_tiles else gemm_sums.shape[1]
    per_task = -(-m // PARALLEL_TASKS)
    per_task += per_task % TILE_ROWS
    tasks = (m + per_task - 1) // per_task
    # Not numba.get_num_threads(): it compiles to the address of a function, and kernels using it cannot be cached.
    slots = min(tasks, gemm_sums.shape[0])
    for slot in prange(slots):
        sums, slot_lanes, codes, slot_tile_sums = gemm_sums[slot], lanes[slot], row_codes[slot], tile_sums[slot]
        for task in range(slot * tasks // slots, (slot + 1) * tasks // slots):
            first = task * per_task
            last = min(m, first + per_task)
            if on_tiles:
                _gemm_tiles(isa, w, first, last, tiles, codes, slot_tile_sums, n, q_sum, act_scale, scale, scale_step,
                            acc, out, as_float)
            elif tiled:
                for start in range(first, last, GEMM_ROWS):
                    rows = min(last - start, GEMM_ROWS)
                    _gemm_rows(isa, w, start, rows, q, tiled, sums, slot_lanes)
                    for t in range(tiled):  # token-major: each token's outputs are adjacent
                        emit_rows(t, start, sums[t], rows, q_sum, act_scale, scale, scale_step, acc, out, as_float)
            half = (last - first + 1) // 2
            for r0 in range(first, first + half):
                r1 = r0 + half if r0 + half < last else r0
                for t in range(tiled, n):
                    s0, s1 = _row_pair(isa, w, r0, r1, q, t, slot_lanes)
                    emit(t, r0, s0, q_sum, act_scale, scale, scale_step, acc, out, as_float)
                    emit(t, r1, s1, q_sum, act_scale, scale, scale_step, acc, out, as_float)


@njit(**KERNEL)
def _matmul(isa, x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float, gemm_sums, lanes, wide, row_codes,
            tile_sums, tiles):
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
    _multiply(isa, w, q, q_sum, act_scale, scale, scale_step, acc, out, as_float, gemm_sums, lanes, wide, row_codes,
              tile_sums, tiles)


def _multiply(isa, w, q, q_sum, act_scale, scale, scale_step, acc, out, as_float, gemm_sums, lanes, wide, row_codes,
              tile_sums, tiles):
    """``lanes_matmul`` on avx512vnni (``i2x16`` weights, no scratch), ``ternary_matmul`` on the other paths."""


@overload(_multiply, jit_options=KERNEL)
def _multiply_for(isa, w, q, q_sum, act_scale, scale, scale_step, acc, out, as_float, gemm_sums, lanes, wide,
                  row_codes, tile_sums, tiles):
    if isa.isa == _LANES_PATH:

        def on_lanes(isa, w, q, q_sum, act_scale, scale, scale_step, acc, out, as_float, gemm_sums, lanes, wide,
                     row_codes, tile_sums, tiles):
            lanes_matmul(isa, w, q, q_sum, act_scale, scale, scale_step, acc, out, as_float)

        return on_lanes

    def on_i2(isa, w, q, q_sum, act_scale, scale, scale_step, acc, out, as_float, gemm_sums, lanes, wide, row_codes,
              tile_sums, tiles):
        if tiles.shape[0]:
            _fill_tiles(isa, q, tiles)
        ternary_matmul(isa, w, _activations_for(isa, q, wide), q_sum, act_scale, scale, scale_step, acc, out,
                       as_float, gemm_sums, lanes, row_codes, tile_sums, tiles)

    return on_i2


def _full_scratch(isa, scratch):
    """The six scratch arrays of ``_matmul`` from the ones the entry point of ``isa`` takes (``scratch_shapes``),
    the rest filled in with the empty ``_NO_*`` constants at compile time."""


@overload(_full_scratch, jit_options=KERNEL)
def _full_scratch_for(isa, scratch):
    if isa.isa == "portable":
        return lambda isa, scratch: (scratch[0], scratch[1], scratch[2], _NO_CODES, _NO_TILE_SUMS, _NO_TILES)
    if isa.isa == "amx":
        return lambda isa, scratch: (scratch[0], _NO_LANES, _NO_WIDE, scratch[1], scratch[2], scratch[3])
    if isa.isa == _LANES_PATH:
        return lambda isa, scratch: (_NO_GEMM_SUMS, _NO_LANES, _NO_WIDE, _NO_CODES, _NO_TILE_SUMS, _NO_TILES)
    return lambda isa, scratch: (scratch[0], _NO_LANES, _NO_WIDE, _NO_CODES, _NO_TILE_SUMS, _NO_TILES)


def _entry_point(isa) -> numba.core.registry.CPUDispatcher:
    """The compiled entry of one path: ``_matmul`` with the ISA marker ``isa`` fixed.

    The marker is a compile-time constant here, not an argument (as one it would cost ~3 us
    of type dispatch per call), and the entry takes only the scratch its path uses
    (``scratch_shapes``), which saves ~0.5 us more. Numba's cache tells the entries apart
    by their names and the marker they close over.
    """

    def entry(x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float, *scratch):
        _matmul(isa, x, w, q, act_scale, q_sum, scale, scale_step, acc, out, as_float, *_full_scratch(isa, scratch))

    entry.__name__ = entry.__qualname__ = f"matmul_{isa.name}"
    return njit(**KERNEL)(entry)


ENTRY_POINTS = {name: _entry_point(marker) for name, marker in MARKERS.items()}



NO_ACC = np.zeros((0, 0), np.int32)
"""The int32 result a float matmul does not write, for ``matmul_float``'s workspace (passed as an
argument: Numba makes a global array read-only, which the kernel's other branch could not type)."""


@njit(**KERNEL, inline="always")
def matmul_float(isa, x, w, scale, scale_step, workspace, out):
    """The float entry as a compiled caller (``decoder``) takes it: ``out = x @ W.T`` with the weights
    ``w``, ``scale`` and ``scale_step`` of one path, and ``workspace`` = ``(q, act_scale, q_sum,
    NO_ACC, scratch)``: the int8 activations, their scales and sums, and the path's ``scratch_shapes``."""
    q, act_scale, q_sum, no_acc, scratch = workspace
    _matmul(isa, x, w, q, act_scale, q_sum, scale, scale_step, no_acc, out, True, *_full_scratch(isa, scratch))

"""The ternary matmul on Intel AMX tiles (the ``amx`` path, batches of ``AMX_MIN_TOKENS`` tokens or more).

All tokens go through the tiles: 32 rows x 32 tokens per pass, the codes decoded to bytes
once per 32 rows, ``tdpbusd`` doing 16 x 16 x 64 byte multiply-adds at a time
(``bitnet.kernels.amx`` holds the tile instructions).
"""

from __future__ import annotations

from numba import njit

from . import amx
from .amx import TILE_CONFIG, load_config, release_tiles, tile_dot, tile_load, tile_store, tile_zero
from .simd import AMX
from .ternary_blocks import AMX_ROWS, AMX_TOKENS, KERNEL, decode_rows, emit


@njit(**KERNEL)
def gemm_amx(w, first, last, tiles, codes, sums, n, q_sum, act_scale, scale, scale_step, acc, out, as_float):
    """Rows ``first .. last - 1`` x all ``n`` tokens with AMX tiles, 32 rows x 32 tokens a pass.

    Tiles 4, 5: the stored codes of 16 rows each (decoded to bytes once per 32 rows into
    ``codes``, uint8 ``(AMX_ROWS, kp)``, by ``decode_rows``); tiles 6, 7: 16 tokens' activations
    each (``tiles`` from ``vnni_activations``); tiles 0-3: the four 16 x 16 int32 sums, stored
    to ``sums`` (int32 ``(AMX_ROWS, AMX_TOKENS)``). Rows past ``last`` and tokens past ``n`` are
    computed on whatever the buffers hold and never stored.
    """
    chunks, _, tokens = tiles.shape
    kp = chunks * amx.TILE_BYTES
    stride = tokens * 4
    load_config(TILE_CONFIG)
    for start in range(first, last, AMX_ROWS):
        rows = min(last - start, AMX_ROWS)
        decode_rows(AMX, w, start, rows, codes)
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
                    emit(t0 + j, start + i, sums[i, j], q_sum, act_scale, scale, scale_step, acc, out, as_float)
    release_tiles()

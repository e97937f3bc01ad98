"""Numba kernels for weight ternarization and per-row int8 activation quantization.

Kernels take plain, C-contiguous 2-D arrays and trust their caller (``bitnet.quant``)
to have validated shapes, dtypes and finiteness. Every loop over rows is a ``prange``;
each row is computed by one thread in a fixed order, so results do not depend on the
number of threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Paper-exact clamps, as float32 so comparisons happen in the input's precision.
WEIGHT_SCALE_MIN = np.float32(1e-5)
ACTIVATION_ABSMAX_MIN = np.float32(1e-5)
INT8_LEVELS = np.float32(127.0)

_KERNEL = dict(cache=True, nogil=True, boundscheck=False)


@njit(parallel=True, fastmath={"reassoc"}, **_KERNEL)
def row_group_abs_sums(w, group):
    """Sum of |w| over each run of ``group`` consecutive elements of each row, in float64.

    Returns shape ``(rows, cols // group)``. ``reassoc`` lets the sum vectorize; a row is
    still summed by a single thread, so the result is the same for any thread count.
    """
    rows, cols = w.shape
    ngroups = cols // group
    out = np.empty((rows, ngroups), np.float64)
    for r in prange(rows):
        for g in range(ngroups):
            acc = 0.0
            for j in range(g * group, (g + 1) * group):
                acc += abs(np.float64(w[r, j]))
            out[r, g] = acc
    return out


@njit(parallel=True, **_KERNEL)
def ternarize(w, threshold, group):
    """Ternary codes ``+1 if w > t``, ``-1 if w < -t``, else 0, with ``t = threshold[r, j // group]``.

    With ``t`` from ``round_half_thresholds`` this is exactly ``clip(rint(w / s), -1, 1)``
    and vectorizes to compares (no division).
    """
    rows, cols = w.shape
    codes = np.empty((rows, cols), np.int8)
    for r in prange(rows):
        for g in range(cols // group):
            t = threshold[r, g]
            for j in range(g * group, (g + 1) * group):
                codes[r, j] = np.int8(w[r, j] > t) - np.int8(w[r, j] < -t)
    return codes


@njit(parallel=True, **_KERNEL)
def quantize_rows_int8(x, q, act_scale_out):
    """Per-row absmax int8 quantization, written into ``q`` and ``act_scale_out``.

    ``a = 127 / max(max|x_row|, 1e-5)`` and ``q = clip(round(x * a), -128, 127)``, all in
    float32 as the paper and HF transformers compute it. A row holding NaN or Inf gets
    ``a = NaN`` and ``q = 0``, so anything scaled by ``1 / a`` downstream becomes NaN
    instead of finite garbage.
    """
    rows, cols = x.shape
    for r in prange(rows):
        amax = np.float32(0.0)
        finite = True
        for j in range(cols):
            v = abs(x[r, j])
            if not (v <= np.float32(3.4028235e38)):
                finite = False
            amax = max(amax, v)
        if not finite:
            act_scale_out[r] = np.float32(np.nan)
            for j in range(cols):
                q[r, j] = 0
            continue
        a = INT8_LEVELS / max(amax, ACTIVATION_ABSMAX_MIN)
        act_scale_out[r] = a
        for j in range(cols):
            v = np.rint(x[r, j] * a)
            q[r, j] = np.int8(min(max(v, np.float32(-128.0)), np.float32(127.0)))


@njit(parallel=True, **_KERNEL)
def codes_are_ternary(codes):
    """Whether every int8 code is -1, 0 or +1, in one pass (``code + 1`` as a byte is at most 2)."""
    flat = codes.reshape(-1).view(np.uint8)
    outside = 0
    for i in prange(flat.size):
        outside += ((flat[i] + 1) & 0xFF) > 2
    return outside == 0

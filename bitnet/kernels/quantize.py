"""Numba kernels for weight ternarization and per-row int8 activation quantization.

Kernels take plain, C-contiguous 2-D arrays and trust their caller (``bitnet.quant``)
to have validated shapes, dtypes and finiteness. Every loop over rows is a ``prange``;
each row is computed by one thread in a fixed order, so results do not depend on the
number of threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .simd import float32_from_bits

# Paper-exact clamps, as float32 so comparisons happen in the input's precision.
WEIGHT_SCALE_MIN = np.float32(1e-5)
ACTIVATION_ABSMAX_MIN = np.float32(1e-5)
INT8_LEVELS = np.float32(127.0)
ABS_BITS = np.uint32(0x7FFFFFFF)  # float32 bits without the sign
INF_BITS = np.uint32(0x7F800000)  # float32 bits of +Inf; NaNs are above

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


@njit(inline="always", **_KERNEL)  # as a call its loops ran 1.6x slower (0.9 -> 1.4 us at k = 2560)
def quantize_span(src, dst):
    """``dst = clip(rint(src a), -128, 127)`` as int8 with ``a = 127 / max(max|src|, 1e-5)``; returns ``(a, sum(dst))``.

    The one implementation of absmax int8 activation quantization (float32 throughout),
    behind the per-token ``quantize_row`` and the per-block ``quantize_blocks``. ``src``
    holding NaN or Inf gives ``a = NaN`` and ``dst = 0``, so the outputs come out NaN.

    ``max|src|`` is taken on the float bits as unsigned integers (sign bit cleared), which
    order like the magnitudes and vectorize, unlike a float ``max`` that must honour NaN
    (7x faster than one); bits at or above those of +Inf flag a NaN or Inf.
    """
    bits = src.view(np.uint32)
    top = np.uint32(0)
    for j in range(src.shape[0]):
        top = max(top, np.uint32(bits[j] & ABS_BITS))
    if top >= INF_BITS:
        dst[:] = 0
        return np.float32(np.nan), 0
    amax = float32_from_bits(top)
    a = INT8_LEVELS / max(amax, ACTIVATION_ABSMAX_MIN)
    total = 0
    for j in range(src.shape[0]):
        v = np.int8(min(max(np.rint(src[j] * a), np.float32(-128.0)), np.float32(127.0)))
        dst[j] = v
        total += v
    return a, total


@njit(**_KERNEL)
def quantize_row(x, t, q, act_scale, q_sum):
    """Row ``t`` of ``x`` to int8 in ``q[t]`` (zero padding after it), its scale ``a`` and ``sum(q)``.

    Per-token quantization as BitNet's BitLinear does it (``quantize_span`` over the row).
    """
    k = x.shape[1]
    q[t, k:] = 0
    act_scale[t], q_sum[t] = quantize_span(x[t], q[t, :k])


@njit(**_KERNEL)
def quantize_blocks(x, t, q, block_scale, block):
    """Row ``t`` of ``x`` to int8 in ``q[t]``, each run of ``block`` values with its own scale.

    ``block_scale[t, i]`` is ``1 / a`` of block ``i`` (values ``block i .. block (i + 1) - 1``),
    which is what the int8 head kernel multiplies the block's dot products by.
    """
    k = x.shape[1]
    for start in range(0, k, block):
        stop = min(k, start + block)
        a, _ = quantize_span(x[t, start:stop], q[t, start:stop])
        block_scale[t, start // block] = np.float32(1.0) / a


@njit(parallel=True, **_KERNEL)
def quantize_padded(x, q, act_scale, q_sum):
    """Quantize every row of ``x`` (n, k) into ``q`` (n, >= k, zero-padded), ``act_scale`` and ``q_sum``."""
    for t in prange(x.shape[0]):
        quantize_row(x, t, q, act_scale, q_sum)


@njit(parallel=True, **_KERNEL)
def codes_are_ternary(codes):
    """Whether every int8 code is -1, 0 or +1, in one pass (``code + 1`` as a byte is at most 2)."""
    flat = codes.reshape(-1).view(np.uint8)
    outside = 0
    for i in prange(flat.size):
        outside += ((flat[i] + 1) & 0xFF) > 2
    return outside == 0

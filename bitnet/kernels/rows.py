"""Numba kernels for the float32 row-wise parts of a transformer layer: norms and gated activations.

Each kernel writes into a buffer its caller provides (a step temporary from
``bitnet.nn.scratch``), so a decode step allocates nothing, and fuses what one layer does
between two matmuls into a single call, which keeps the Python overhead per token low.
The arithmetic follows HF transformers' float32 BitNet: ``w * (x / sqrt(mean(x^2) + eps))``,
and the activations as it computes them (attention and rope: ``attention``).

Each kernel exists twice (``bitnet.kernels.variants``): ``serial.<name>`` for decode steps,
whose few rows are too little work to pay for waking the thread pool, and
``parallel.<name>``, which splits rows over threads for prefill.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from numba import prange

from .variants import serial_and_parallel

# Reassociation lets the reductions vectorize. No "nnan"/"ninf" (a NaN or Inf activation must
# come out as NaN or Inf, not as whatever the optimizer assumed), and numpy's error model so a
# division by zero gives inf/NaN instead of raising ZeroDivisionError.
_KERNEL = dict(fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy", cache=True, nogil=True,
               boundscheck=False)
# Below this many tokens a call runs on the calling thread (rope too, ``attention.for_rope``: its cache
# lines are cold in a decode step, and from 8 rows two threads wait on their misses side by side).
PARALLEL_MIN_ROWS = 8


def rms_norm(x, weight, eps, out):
    """``out[i] = weight * x[i] / sqrt(mean(x[i]^2) + eps)`` for each row ``i``."""
    n, k = x.shape
    for i in prange(n):
        acc = np.float32(0.0)
        for j in range(k):
            acc += x[i, j] * x[i, j]
        inv = np.float32(1.0) / np.sqrt(acc / np.float32(k) + eps)
        for j in range(k):
            out[i, j] = weight[j] * (x[i, j] * inv)


def add_rms_norm(x, delta, weight, eps, out):
    """``x += delta`` (the residual update), then ``out = rms_norm(x)``."""
    n, k = x.shape
    for i in prange(n):
        acc = np.float32(0.0)
        for j in range(k):
            v = x[i, j] + delta[i, j]
            x[i, j] = v
            acc += v * v
        inv = np.float32(1.0) / np.sqrt(acc / np.float32(k) + eps)
        for j in range(k):
            out[i, j] = weight[j] * (x[i, j] * inv)


def gated_activation(gate_up, silu, weight, eps, normalize, out):
    """``out = act(gate) * up``, then ``rms_norm`` of it when ``normalize``; ``gate_up = [gate | up]`` per row.

    ``act`` is ``silu(g) = g * (1 / (1 + exp(-g)))`` (Llama, 1bitLLM) or ``relu(g)^2`` (BitNet
    b1.58 2B4T), as transformers computes them in float32.
    """
    n, width = out.shape
    for i in prange(n):
        acc = np.float32(0.0)
        for j in range(width):
            g = gate_up[i, j]
            if silu:
                a = g * (np.float32(1.0) / (np.float32(1.0) + np.exp(-g)))
            else:
                r = max(g, np.float32(0.0))
                a = r * r
            v = a * gate_up[i, width + j]
            out[i, j] = v
            acc += v * v
        if normalize:
            inv = np.float32(1.0) / np.sqrt(acc / np.float32(width) + eps)
            for j in range(width):
                out[i, j] = weight[j] * (out[i, j] * inv)


_ROW_KERNELS = (rms_norm, add_rms_norm, gated_activation)
serial, parallel = serial_and_parallel(_ROW_KERNELS, **_KERNEL)


def threaded(n: int) -> bool:
    """Whether a call on ``n`` tokens runs on every thread (rope's too, ``attention.for_rope``)."""
    return n >= PARALLEL_MIN_ROWS


def for_rows(n: int) -> SimpleNamespace:
    """The kernel set to use for a call on ``n`` tokens."""
    return parallel if threaded(n) else serial


"""Numba kernels for the float32 parts of a transformer layer: norms, rope, attention, gated activations.

Each kernel writes into a buffer its caller provides (a step temporary from
``bitnet.nn.scratch``), so a decode step allocates nothing, and fuses what one layer does
between two matmuls into a single call, which keeps the Python overhead per token low.
The arithmetic follows HF transformers' float32 BitNet: ``w * (x / sqrt(mean(x^2) + eps))``,
rope as ``x * cos + rotate_half(x) * sin``, softmax as ``exp(s - max) / sum``.

Row kernels exist twice: ``serial.<name>`` for decode steps, whose few rows are too little
work to pay for waking the thread pool (and a busy machine makes that wake-up slow), and
``parallel.<name>``, which splits rows (or heads) over threads for prefill. Both compile the
same Python source, so they compute the same values.
"""

from __future__ import annotations

from types import FunctionType, SimpleNamespace

import numpy as np
from numba import njit, prange

# Reassociation lets the reductions vectorize. No "nnan"/"ninf" (a NaN or Inf activation must
# come out as NaN or Inf, not as whatever the optimizer assumed), and numpy's error model so a
# division by zero gives inf/NaN instead of raising ZeroDivisionError.
_KERNEL = dict(fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy", cache=True, nogil=True,
               boundscheck=False)
PARALLEL_MIN_ROWS = 8  # below this many tokens a call runs on the calling thread
# Attention over this many positions is worth threads even for one token: in a decode step the
# KV cache comes back from DRAM (the weights evicted it), and two threads read it faster
# (2B4T shapes, 2 threads: neutral at 40-68 positions, -2.5 ms a step at 176, -6 ms at 336).
PARALLEL_MIN_CONTEXT = 64


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


@njit(**_KERNEL)
def _rotate(src, cos, sin, pos, dst):
    """Rotate one head vector: ``dst = src * cos + rotate_half(src) * sin`` at position ``pos``."""
    half = src.shape[0] // 2
    for j in range(half):
        first, second = src[j], src[half + j]
        dst[j] = first * cos[pos, j] - second * sin[pos, j]
        dst[half + j] = second * cos[pos, half + j] + first * sin[pos, half + j]


@njit(**_KERNEL)
def rope_into_cache(qkv, heads, kv_heads, cos, sin, start, queries, keys, values):
    """Split fused q|k|v rows, rotate q and k, and append k and v to the cache at ``start``.

    ``qkv``: ``(n, (heads + 2 kv_heads) d)``; ``queries``: ``(n, heads, d)`` output;
    ``keys``/``values``: ``(kv_heads, capacity, d)`` caches, rows ``start .. start + n`` written.
    """
    n = qkv.shape[0]
    d = queries.shape[2]
    k_base, v_base = heads * d, (heads + kv_heads) * d
    for i in range(n):
        pos = start + i
        for h in range(heads):
            _rotate(qkv[i, h * d : (h + 1) * d], cos, sin, pos, queries[i, h])
        for h in range(kv_heads):
            _rotate(qkv[i, k_base + h * d : k_base + (h + 1) * d], cos, sin, pos, keys[h, pos])
            values[h, pos, :] = qkv[i, v_base + h * d : v_base + (h + 1) * d]


def causal_attention(queries, keys, values, start, scaling, scores, out):
    """Softmax attention of each query over cache positions ``0 .. start + i`` (causal).

    ``queries``: ``(n, heads, d)``, query ``i`` at position ``start + i``; ``keys``/``values``:
    ``(kv_heads, capacity, d)``, query head ``h`` reading kv head ``h // (heads / kv_heads)``;
    ``scores``: ``(heads, >= start + n)`` scratch; ``out``: ``(n, heads * d)``.
    """
    n, heads, d = queries.shape
    group = heads // keys.shape[0]
    scaling = np.float32(scaling)  # a Python float would turn the dot products into float64 (3x slower)
    for h in prange(heads):
        kv = h // group
        row = scores[h]
        for i in range(n):
            length = start + i + 1
            top = np.float32(-np.inf)
            for t in range(length):
                acc = np.float32(0.0)
                for j in range(d):
                    acc += queries[i, h, j] * keys[kv, t, j]
                acc *= scaling
                row[t] = acc
                top = max(top, acc)
            total = np.float32(0.0)
            for t in range(length):
                e = np.exp(row[t] - top)
                row[t] = e
                total += e
            inv = np.float32(1.0) / total
            context = out[i, h * d : (h + 1) * d]
            context[:] = 0.0
            for t in range(length):
                p = row[t] * inv
                for j in range(d):
                    context[j] += p * values[kv, t, j]


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


def _renamed(f: FunctionType, suffix: str) -> FunctionType:
    """A copy of ``f`` under another name, so that Numba's on-disk cache keeps both compilations apart."""
    copy = FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__, f.__closure__)
    copy.__qualname__ = f.__qualname__ + suffix
    return copy


_ROW_KERNELS = (rms_norm, add_rms_norm, causal_attention, gated_activation)
serial = SimpleNamespace(**{f.__name__: njit(**_KERNEL)(f) for f in _ROW_KERNELS})
parallel = SimpleNamespace(**{f.__name__: njit(parallel=True, **_KERNEL)(_renamed(f, "_parallel"))
                              for f in _ROW_KERNELS})


def for_rows(n: int) -> SimpleNamespace:
    """The kernel set to use for a call on ``n`` tokens."""
    return parallel if n >= PARALLEL_MIN_ROWS else serial


def for_attention(n: int, context: int) -> SimpleNamespace:
    """The kernel set for attention of ``n`` queries over ``context`` positions."""
    return parallel if n >= PARALLEL_MIN_ROWS or context >= PARALLEL_MIN_CONTEXT else serial

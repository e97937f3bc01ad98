"""Numba kernels for the float32 parts of a transformer layer: norms, rope, attention, relu2.

Each kernel writes into a buffer its caller provides (a step temporary from
``bitnet.nn.scratch``), so a decode step allocates nothing, and fuses what one layer does
between two matmuls into a single call, which keeps the Python overhead per token low.
The arithmetic follows HF transformers' float32 BitNet: ``w * (x / sqrt(mean(x^2) + eps))``,
rope as ``x * cos + rotate_half(x) * sin``, softmax as ``exp(s - max) / sum``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_KERNEL = dict(fastmath=True, cache=True, nogil=True, boundscheck=False)


@njit(parallel=True, **_KERNEL)
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


@njit(parallel=True, **_KERNEL)
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


@njit(parallel=True, **_KERNEL)
def causal_attention(queries, keys, values, start, scaling, scores, out):
    """Softmax attention of each query over cache positions ``0 .. start + i`` (causal).

    ``queries``: ``(n, heads, d)``, query ``i`` at position ``start + i``; ``keys``/``values``:
    ``(kv_heads, capacity, d)``, query head ``h`` reading kv head ``h // (heads / kv_heads)``;
    ``scores``: ``(heads, >= start + n)`` scratch; ``out``: ``(n, heads * d)``.
    """
    n, heads, d = queries.shape
    group = heads // keys.shape[0]
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


@njit(parallel=True, **_KERNEL)
def relu2_gate_rms_norm(gate_up, weight, eps, out):
    """``out = rms_norm(relu(gate)^2 * up)`` with ``gate_up = [gate | up]`` side by side per row."""
    n, width = out.shape
    for i in prange(n):
        acc = np.float32(0.0)
        for j in range(width):
            g = max(gate_up[i, j], np.float32(0.0))
            v = g * g * gate_up[i, width + j]
            out[i, j] = v
            acc += v * v
        inv = np.float32(1.0) / np.sqrt(acc / np.float32(width) + eps)
        for j in range(width):
            out[i, j] = weight[j] * (out[i, j] * inv)

"""Prefill and decode speed of a BitNet model, and how much of a decode step is not matmul.

``bench_model`` drives :class:`BitNetForCausalLM` the way generation does (one prefill of
the prompt, then one cached step per token) and reports tokens/s, the peak RSS of the
process, and the share of a decode step spent outside the matmul kernels (the BitLinear
matmuls and the head), measured by replaying exactly those kernel calls on their own.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..ops import matmul
from .bitnet import BitNetForCausalLM


@dataclass
class BenchResult:
    prompt_tokens: int
    decode_tokens: int
    prefill_seconds: float
    decode_seconds: float
    kernel_seconds_per_step: float
    peak_rss_bytes: int

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds

    @property
    def overhead_share(self) -> float:
        """Fraction of a decode step outside the matmul kernels (Python, norms, rope, attention)."""
        step = self.decode_seconds / self.decode_tokens
        return max(0.0, 1.0 - self.kernel_seconds_per_step / step)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def kernel_seconds_per_step(model: BitNetForCausalLM, repeats: int = 3) -> float:
    """Time of the matmul kernels of one decode step alone: every BitLinear of every layer, and the head."""
    rng = np.random.default_rng(0)
    calls = []
    for layer in model.layers:
        attention, mlp = layer.attention, layer.mlp
        linears = [attention.qkv_proj or attention.projections[0], attention.o_proj,
                   mlp.gate_up_proj or mlp.projections[0], mlp.down_proj]
        for linear in linears:
            x = rng.standard_normal((1, linear.in_features), np.float32)
            calls.append((linear.weight, x, np.empty((1, linear.out_features), np.float32)))
    h = rng.standard_normal((1, model.config.hidden_size), np.float32)
    logits = np.empty((1, model.config.vocab_size), np.float32)

    def step() -> None:
        for weight, x, out in calls:
            matmul(x, weight, out=out)
        model.lm_head.logits(h, out=logits)

    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def bench_model(
    model: BitNetForCausalLM, prompt_tokens: int = 64, decode_tokens: int = 32, seed: int = 0
) -> BenchResult:
    """Prefill a random prompt of ``prompt_tokens`` ids, then decode ``decode_tokens`` greedy steps."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.config.vocab_size, prompt_tokens)
    model.forward(prompt[:8], last_only=True)  # warm-up: compile kernels, touch the weights
    cache = model.new_cache(prompt_tokens + decode_tokens + 1)
    start = time.perf_counter()
    logits = model.forward(prompt, cache, last_only=True)
    prefill = time.perf_counter() - start
    token = int(np.argmax(logits[0]))
    start = time.perf_counter()
    for _ in range(decode_tokens):
        logits = model.forward(np.array([token]), cache)
        token = int(np.argmax(logits[0]))
    decode = time.perf_counter() - start
    kernels = kernel_seconds_per_step(model)
    return BenchResult(prompt_tokens, decode_tokens, prefill, decode, kernels, peak_rss_bytes())

"""Prefill and decode speed of a BitNet model, and how much of a decode step is not matmul.

``bench_model`` drives :class:`BitNetForCausalLM` the way generation does (one prefill of
the prompt, then one cached step per token) and reports tokens/s, the peak RSS of the
process, and two views of what a decode step spends beside the weight streaming:

* outside the matmul kernels: the step minus a replay of exactly its BitLinear matmuls and
  head on their own (so norms, rope, attention and Python all count as "outside");
* Python overhead: the decode step of a model with the same layers and heads but tiny widths,
  where the kernels have almost nothing to do, so what remains is the per-token cost of the
  Python code, kernel dispatch and the arena. It runs on one thread: with nothing to share,
  threads would only add the pool's wake-up latency, which a busy machine inflates.

Every time is the median of several steps, which keeps a busy machine's outliers out.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..bench import timings
from ..ops import get_num_threads, matmul, set_num_threads
from .bitnet import BitNetForCausalLM
from .config import BitNetConfig
from .random import random_model


@dataclass
class BenchResult:
    prompt_tokens: int
    decode_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_best_seconds_per_token: float
    kernel_seconds_per_step: float
    python_seconds_per_step: float
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
        return max(0.0, 1.0 - self.kernel_seconds_per_step / self.decode_seconds_per_token)

    @property
    def decode_seconds_per_token(self) -> float:
        return self.decode_seconds / self.decode_tokens

    @property
    def python_share(self) -> float:
        """Fraction of a decode step that is Python, dispatch and arena overhead."""
        return min(1.0, self.python_seconds_per_step / self.decode_seconds_per_token)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def kernel_seconds_per_step(model: BitNetForCausalLM, repeats: int = 5) -> float:
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

    return timings(step, min_time=0.0, min_repeats=repeats, max_repeats=repeats)[0]


def _decode_step_seconds(model: BitNetForCausalLM, steps: int, prompt: np.ndarray) -> list[float]:
    """Wall time of each of ``steps`` greedy decode steps after prefilling ``prompt``."""
    cache = model.new_cache(len(prompt) + steps + 1)
    logits = model.forward(prompt, cache, last_only=True)
    token = np.zeros(1, np.int64)
    times = []
    for _ in range(steps):
        token[0] = int(np.argmax(logits[0]))
        start = time.perf_counter()
        model.forward(token, cache, out=logits)
        times.append(time.perf_counter() - start)
    return times


def python_seconds_per_step(config: BitNetConfig, steps: int = 20) -> float:
    """Median decode step of a model with ``config``'s layers and heads but tiny widths."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    skeleton = BitNetConfig(vocab_size=256, hidden_size=8 * heads, intermediate_size=64, head_dim=8,
                            num_hidden_layers=config.num_hidden_layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, eos_token_id=None)
    model = random_model(skeleton, head_dtype="f32")
    threads = get_num_threads()
    set_num_threads(1)
    try:
        _decode_step_seconds(model, 3, np.arange(8))  # warm-up
        return float(np.median(_decode_step_seconds(model, steps, np.arange(8))))
    finally:
        set_num_threads(threads)


def bench_model(
    model: BitNetForCausalLM, prompt_tokens: int = 64, decode_tokens: int = 32, seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Prefill a random prompt of ``prompt_tokens`` ids, then time ``decode_tokens`` greedy steps.

    ``decode_seconds`` is the median step times ``decode_tokens``, so one descheduled step on
    a shared machine does not drag the rate down; ``decode_best_seconds_per_token`` is the
    fastest step, the spread between them shows how busy the machine was. ``progress`` is
    called with the name of each phase as it begins.
    """
    stage = progress or (lambda name: None)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.config.vocab_size, prompt_tokens)
    stage("warming up (kernel compilation, first touch of the weights)")
    _decode_step_seconds(model, 2, prompt[:8])
    stage(f"prefill of {prompt_tokens} tokens")
    start = time.perf_counter()
    model.forward(prompt, last_only=True)
    prefill = time.perf_counter() - start
    stage(f"{decode_tokens} decode steps")
    steps = _decode_step_seconds(model, decode_tokens, prompt)
    stage("matmul kernels alone")
    kernels = kernel_seconds_per_step(model)
    stage("Python overhead (a model of tiny widths)")
    python = python_seconds_per_step(model.config)
    return BenchResult(prompt_tokens, decode_tokens, prefill, float(np.median(steps)) * decode_tokens, min(steps),
                       kernels, python, peak_rss_bytes())

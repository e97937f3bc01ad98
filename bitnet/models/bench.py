"""Prefill and decode speed of a BitNet model, the DRAM bandwidth bound, and what of a decode step is not matmul.

``bench_model`` drives :class:`BitNetForCausalLM` the way generation does (a prefill of the
prompt, then one cached step per token) for several runs and reports, per run and as the
median with its min-max: prefill and decode tokens/s, the DRAM read bandwidth measured in
the same process after each decode step, and the share of the bandwidth bound a decode step
reaches.
A decode step streams every ternary projection, the head table and the cached keys and
values once, so ``bandwidth / bytes per step`` is the most tokens/s it can give.

Beside the weight streaming it reports two views of what a decode step spends:

* outside the matmul kernels: the step minus a replay of exactly its BitLinear matmuls and
  head on their own (so norms, rope, attention and Python all count as "outside");
* Python overhead: the decode step of a model with the same layers and heads but tiny widths,
  where the kernels have almost nothing to do, so what remains is the per-token cost of the
  Python code, kernel dispatch and the arena. It runs on one thread: with nothing to share,
  threads would only add the pool's wake-up latency, which a busy machine inflates.

Runs are interleaved (prefill, decode steps each followed by a read pass, the kernels alone),
so a machine whose bandwidth drifts with other tenants' load moves them together: the read
passes see the same seconds as the steps they bound (a pass after the steps, or after the run,
saw other seconds of a DRAM moving 34-64 GB/s), each ratio is taken within a run, and the
medians keep one busy run's outliers out.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit, prange

from .. import errors
from ..bench import timings
from ..nn import KVCache, scratch
from ..ops import get_num_threads, matmul, set_num_threads
from .bitnet import BitNetForCausalLM
from .config import BitNetConfig
from .random import random_model

# The bandwidth read pass covers at least this much and 4x the last-level cache, so that
# almost every byte comes from DRAM, as a decode step's weights do.
MIN_READ_PASS_BYTES = 512 * 2**20
# Context is filled in chunks of this many tokens: one forward pass over all of it would hold
# heads x N x N attention scores (335 MB for 2B4T at 2048), which would count in the peak RSS.
CONTEXT_CHUNK = 256


@dataclass(frozen=True)
class Spread:
    """Median and min-max of one figure over the runs."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(float(np.median(values)), float(np.min(values)), float(np.max(values)))


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step reads at least: each is read once per token, nothing else is large."""

    ternary: int  # every projection the step runs (packed weights and their scales)
    head: int  # the output head's table (and row scales)
    kv_cache: float  # keys and values of the attended positions, in the cache's dtype

    @property
    def total(self) -> float:
        return self.ternary + self.head + self.kv_cache


@dataclass
class BenchResult:
    prompt_tokens: int
    decode_tokens: int
    context: int  # cached positions before the first timed decode step
    prefill_seconds: list[float]  # per run
    decode_seconds: list[float]  # per run: the wall time of its decode_tokens steps
    step_seconds: list[float]  # every decode step of every run
    read_bytes_per_second: list[float]  # per run: the median of the read passes after each of its steps
    step_bytes: StepBytes  # at the mean position of the timed steps
    kernel_seconds: list[float]  # per run: the matmul kernels of one step alone, timed right after its steps
    python_seconds_per_step: float
    peak_rss_bytes: int

    @property
    def prefill_tokens_per_second(self) -> Spread:
        return Spread.of([self.prompt_tokens / s for s in self.prefill_seconds])

    @property
    def decode_tokens_per_second(self) -> Spread:
        return Spread.of([self.decode_tokens / s for s in self.decode_seconds])

    @property
    def read_bandwidth(self) -> Spread:
        """DRAM read bandwidth, bytes/s."""
        return Spread.of(self.read_bytes_per_second)

    @property
    def bound_tokens_per_second(self) -> Spread:
        """Decode tokens/s if a step took only the time to read its bytes at the measured bandwidth."""
        return Spread.of([b / self.step_bytes.total for b in self.read_bytes_per_second])

    @property
    def bound_fraction(self) -> Spread:
        """Decode rate over the bound, each run against the bandwidth measured in that run."""
        return Spread.of([self.decode_tokens * self.step_bytes.total / (s * b)
                          for s, b in zip(self.decode_seconds, self.read_bytes_per_second, strict=True)])

    @property
    def decode_seconds_per_token(self) -> float:
        """Median decode step over every run."""
        return float(np.median(self.step_seconds))

    @property
    def decode_best_seconds_per_token(self) -> float:
        return float(np.min(self.step_seconds))

    @property
    def kernel_seconds_per_step(self) -> float:
        """Median over the runs of the matmul kernels of one step alone."""
        return float(np.median(self.kernel_seconds))

    @property
    def overhead_share(self) -> float:
        """Fraction of a decode step outside the matmul kernels (Python, norms, rope, attention): the
        median over the runs of each run's kernels against its own median step, so that both sides
        of a ratio see the same minute of a machine whose DRAM speed drifts."""
        runs = len(self.kernel_seconds)
        per_run = np.reshape(self.step_seconds, (runs, -1))
        return float(np.median([max(0.0, 1.0 - kernels / np.median(steps))
                                for kernels, steps in zip(self.kernel_seconds, per_run, strict=True)]))

    @property
    def python_share(self) -> float:
        """Fraction of a decode step that is Python, dispatch and arena overhead."""
        return min(1.0, self.python_seconds_per_step / self.decode_seconds_per_token)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _largest_cache_bytes() -> int:
    """Size of the largest CPU cache Linux lists for CPU 0, or 0 where there is no such listing."""
    sizes = [0]
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        if text[:-1].isdigit() and text[-1] in "KM":
            sizes.append(int(text[:-1]) * (2**10 if text[-1] == "K" else 2**20))
    return max(sizes)


def read_pass_bytes() -> int:
    """Size of the bandwidth read pass: 512 MiB, or 4x the last-level cache where that is more."""
    return max(MIN_READ_PASS_BYTES, 4 * _largest_cache_bytes())


@njit(parallel=True, cache=True)
def _read_pass(words: np.ndarray) -> np.uint64:
    # A sum the compiler cannot drop: every word is loaded once, across numba's threads.
    total = np.uint64(0)
    for i in prange(words.size):
        total += words[i]
    return total


def read_bandwidth(buffer: np.ndarray) -> float:
    """DRAM read bandwidth in bytes/s: one sum over ``buffer`` (uint64) on numba's threads."""
    return buffer.nbytes / timings(lambda: _read_pass(buffer), min_time=0.0, min_repeats=1, max_repeats=1)[0]


def decode_step_bytes(model: BitNetForCausalLM, positions: float) -> StepBytes:
    """What a decode step attending to ``positions`` cached positions reads (norm gains and one embedding row aside)."""
    c = model.config
    ternary = sum(linear.weight.nbytes for linear in model.running_linears())
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * np.dtype(model.kv_dtype).itemsize * positions
    return StepBytes(ternary, model.lm_head.nbytes, float(kv))


def check_lengths(config: BitNetConfig, prompt_tokens: int, decode_tokens: int, context: int) -> None:
    """Raise InvalidValueError unless the prompt, and the context with the decode steps after it, fit the model."""
    limit = config.max_position_embeddings
    if prompt_tokens > limit or context + decode_tokens > limit:
        raise errors.InvalidValueError(
            f"the model's context is {limit} positions (config.max_position_embeddings): the prompt "
            f"({prompt_tokens} tokens) and the context plus the decode steps ({context} + {decode_tokens}) must fit")


def kernel_seconds_per_step(model: BitNetForCausalLM, repeats: int = 5) -> float:
    """Time of the matmul kernels of one decode step alone: every BitLinear of every layer, and the head.

    Where the model runs its layers in one compiled call, the projections run the same way
    (``CompiledLayers.run_projections``): called one by one from Python they took ~1 ms more a
    step than in the model, as much as everything else outside them.
    """
    rng = np.random.default_rng(0)
    h = rng.standard_normal((1, model.config.hidden_size), np.float32)
    logits = np.empty((1, model.config.vocab_size), np.float32)
    compiled = model._current_layers()
    with scratch.step():
        if compiled.reason is None:
            for values in compiled.projection_inputs(1):
                values[:] = rng.standard_normal(values.shape, np.float32)
            projections = functools.partial(compiled.run_projections, 1)
        else:
            calls = [(linear.weight, rng.standard_normal((1, linear.in_features), np.float32),
                      np.empty((1, linear.out_features), np.float32)) for linear in model.running_linears()]

            def projections() -> None:
                for weight, x, out in calls:
                    matmul(x, weight, out=out)

        def step() -> None:
            projections()
            model.lm_head.logits(h, out=logits)

        return timings(step, min_time=0.0, min_repeats=repeats, max_repeats=repeats)[0]


def filled_cache(
    model: BitNetForCausalLM, positions: int, room: int, rng: np.random.Generator
) -> tuple[KVCache, np.ndarray]:
    """A cache holding ``positions`` random tokens (drawn from ``rng``) with ``room`` more positions,
    and the logits of its last position (zeros, so that the first token is id 0, when empty)."""
    cache = model.new_cache(positions + room)
    logits = np.zeros((1, model.config.vocab_size), np.float32)
    filler = rng.integers(0, model.config.vocab_size, positions)
    for start in range(0, positions, CONTEXT_CHUNK):
        logits = model.forward(filler[start : start + CONTEXT_CHUNK], cache, last_only=True)
    return cache, logits


def _decode_step_seconds(model: BitNetForCausalLM, steps: int, prompt: np.ndarray) -> list[float]:
    """Wall time of each of ``steps`` greedy decode steps after prefilling ``prompt``."""
    cache = model.new_cache(len(prompt) + steps + 1)
    logits = model.forward(prompt, cache, last_only=True)
    return _greedy_steps(model, cache, logits, steps)


def _greedy_steps(model, cache, logits: np.ndarray, steps: int) -> list[float]:
    """Wall time of each of ``steps`` greedy decode steps from ``cache`` and the ``logits`` of its last position."""
    token = np.zeros(1, np.int64)
    times = []
    for _ in range(steps):
        token[0] = int(np.argmax(logits[0]))  # outside the timing: the caller's choice of token
        start = time.perf_counter()
        model.forward(token, cache, out=logits)
        times.append(time.perf_counter() - start)
    return times


def decode_by_context(
    model: BitNetForCausalLM, contexts: Sequence[int], decode_tokens: int = 16, repeats: int = 3, seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[int, Spread]:
    """Decode tokens/s after each of ``contexts`` cached positions: how a long context slows a step.

    One cache is filled once (not timed) with random tokens up to the largest context. Each
    round then takes ``decode_tokens`` greedy steps at every context in turns (step 1 at each
    context, then step 2 at each, ...), rewinding the cache to the context before each step, so
    the contexts share the same seconds of a machine whose memory speed drifts (blocks of steps
    per context were seconds apart, and their ratio moved 75-119% with the DRAM). Returns, per
    context, the median (min-max) over ``repeats`` rounds of the steps' tokens/s.
    """
    contexts = sorted(set(contexts))
    check_lengths(model.config, 1, decode_tokens, contexts[-1])
    stage = progress or (lambda name: None)
    rng = np.random.default_rng(seed)
    stage(f"filling {contexts[-1]} cached positions")
    cache, _ = filled_cache(model, contexts[-1], decode_tokens, rng)
    rates: dict[int, list[float]] = {context: [] for context in contexts}
    for run in range(repeats):
        stage(f"round {run + 1} of {repeats}: {decode_tokens} decode steps after each of "
              f"{', '.join(map(str, contexts))} cached positions, in turns")
        logits = {context: np.zeros((1, model.config.vocab_size), np.float32) for context in contexts}
        seconds = dict.fromkeys(contexts, 0.0)
        for step in range(decode_tokens):
            for context in contexts:
                cache.length = context + step  # a step overwrites a position a larger context filled: same timing
                seconds[context] += _greedy_steps(model, cache, logits[context], 1)[0]
        for context in contexts:
            rates[context].append(decode_tokens / seconds[context])
    return {context: Spread.of(values) for context, values in rates.items()}


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
    model: BitNetForCausalLM, prompt_tokens: int = 64, decode_tokens: int = 32, seed: int = 0, context: int = 0,
    repeats: int = 3, read_bytes: int | None = None, progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time ``repeats`` runs of a prefill and of ``decode_tokens`` greedy steps, and the DRAM bandwidth in each.

    Parameters
    ----------
    model
        The model; kernels are compiled and the weights touched by a warm-up before any timing.
    prompt_tokens
        Random token ids of each timed prefill (from position 0, without a cache).
    decode_tokens
        Timed decode steps per run, the first one after ``context`` cached positions.
    seed
        Seed of the random prompt and context.
    context
        Cached positions before the first decode step, filled once with random tokens
        (not timed); every run rewinds the cache to them, and its steps overwrite the last
        run's.
    repeats
        Runs; the result keeps every run's figures.
    read_bytes
        Size of the bandwidth read pass (default :func:`read_pass_bytes`), run after every timed
        decode step. It is allocated after the first prefill, so the peak RSS reported is the
        model's, not the buffer's.
    progress
        Called with the name of each phase as it begins.

    Returns
    -------
    BenchResult
        Per-run prefill and decode times and bandwidths, the bytes of a step at the mean
        position of the timed steps (``context + (decode_tokens + 1) / 2`` attended), the
        kernel times of a step (per run) and its Python-overhead time, and the peak RSS.
    """
    check_lengths(model.config, prompt_tokens, decode_tokens, context)
    stage = progress or (lambda name: None)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.config.vocab_size, prompt_tokens)
    stage("warming up (kernel compilation, first touch of the weights)")
    _decode_step_seconds(model, 2, prompt[:8])
    if context:
        stage(f"filling {context} cached positions")
    cache, first_logits = filled_cache(model, context, decode_tokens, rng)
    logits = first_logits.copy()
    prefill, decode, steps, bandwidth, kernels = [], [], [], [], []
    buffer, peak = None, 0
    for run in range(repeats):
        label = f"run {run + 1} of {repeats}: " if repeats > 1 else ""
        stage(f"{label}prefill of {prompt_tokens} tokens")
        start = time.perf_counter()
        model.forward(prompt, last_only=True)
        prefill.append(time.perf_counter() - start)
        if buffer is None:  # the peak RSS so far is the model's (a prefill and decode steps ran), not the buffer's
            peak = peak_rss_bytes()
            buffer = np.ones((read_bytes or read_pass_bytes()) // 8, np.uint64)  # every page touched
        stage(f"{label}{decode_tokens} decode steps after {context} cached positions, each followed by a "
              f"{buffer.nbytes / 2**20:.0f} MiB DRAM read pass")
        cache.length = context
        logits[:] = first_logits
        times, passes = [], []
        for _ in range(decode_tokens):
            times += _greedy_steps(model, cache, logits, 1)
            passes.append(read_bandwidth(buffer))
        decode.append(sum(times))
        steps += times
        bandwidth.append(float(np.median(passes)))
        stage(f"{label}matmul kernels alone")
        kernels.append(kernel_seconds_per_step(model))
    del buffer  # hundreds of MiB, not needed by the phases left
    stage("Python overhead (a model of tiny widths)")
    python = python_seconds_per_step(model.config)
    return BenchResult(prompt_tokens, decode_tokens, context, prefill, decode, steps, bandwidth,
                       decode_step_bytes(model, context + (decode_tokens + 1) / 2), kernels, python, peak)

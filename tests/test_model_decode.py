"""Generation: cached decode against full re-forwards, cache growth, sampling, streaming, buffer reuse."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import bitnet as bn
from bitnet.kernels.head import LANES_PATHS
from bitnet.models import Sampler
from bitnet.nn.attention import CacheRows

PROMPT = np.array([5, 77, 3, 120, 64, 9])


@pytest.fixture(scope="module", params=[(4, 2, True), (6, 1, False), (4, 4, True)], ids=["gqa2", "mqa", "mha"])
def model(request):
    heads, kv_heads, tied = request.param
    config = bn.BitNetConfig(vocab_size=130, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                             eos_token_id=None, bos_token_id=None)
    return bn.models.random_model(config, seed=heads + kv_heads, head_dtype="f32")


def assert_same_logits(ours, expected):
    """Equal up to float32 summation order: activation quantization is per row and attention
    per query, so a row gets the same int8 codes alone or in a batch; only BLAS/kernel
    summation order differs between a 1-row and an n-row call (measured ~1e-7 of the range)."""
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_cached_decode_equals_full_reforward_of_the_growing_sequence(model):
    cache = model.new_cache(capacity=2)  # small on purpose: it must grow (doubling) on the way
    step_logits = [model.forward(PROMPT, cache, last_only=True)[0]]
    tokens = list(PROMPT)
    for _ in range(10):
        tokens.append(int(np.argmax(step_logits[-1])))
        step_logits.append(model.forward(np.array(tokens[-1:]), cache)[0])
    assert cache.length == len(tokens) and cache.capacity == 16
    for i, logits in enumerate(step_logits):
        full = model.forward(np.array(tokens[: len(PROMPT) + i]))
        assert_same_logits(logits, full[-1])
    assert model.generate(PROMPT, 10) == tokens[len(PROMPT):]


def test_forward_rows_do_not_depend_on_the_rest_of_the_prompt(model):
    full = model.forward(PROMPT)
    assert_same_logits(model.forward(PROMPT[:3]), full[:3])
    assert_same_logits(model.forward(PROMPT, last_only=True), full[-1:])


def test_long_sequence_grows_rope_and_cache(model):
    ids = np.arange(300) % model.config.vocab_size  # past the initial 256-position tables
    full = model.forward(ids)
    cache = model.new_cache(capacity=8)
    model.forward(ids[:-1], cache)
    assert_same_logits(model.forward(ids[-1:], cache)[0], full[-1])


def test_stream_callback_and_stop_tokens(model):
    greedy = model.generate(PROMPT, 8)
    seen = []
    assert model.generate(PROMPT, 8, callback=seen.append) == greedy == seen
    assert list(model.stream(PROMPT, 8)) == greedy
    assert model.generate(PROMPT, 8, stop=[greedy[2]]) == greedy[: greedy.index(greedy[2]) + 1]
    assert model.generate(PROMPT, 1) == greedy[:1]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    greedy = model.generate(PROMPT, 6)
    first = model.generate(PROMPT, 6, temperature=1.0, seed=3)
    assert model.generate(PROMPT, 6, temperature=1.0, seed=3) == first
    assert model.generate(PROMPT, 6, temperature=0.8, top_k=1, seed=4) == greedy
    assert model.generate(PROMPT, 6, temperature=0.8, top_p=1e-6, seed=4) == greedy


def test_sampler_frequencies_follow_temperature_top_k_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    draws = 4000

    def frequencies(**options):
        sampler = Sampler(seed=0, **options)
        return np.bincount([sampler(logits) for _ in range(draws)], minlength=4) / draws

    np.testing.assert_allclose(frequencies(temperature=1.0), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    np.testing.assert_allclose(frequencies(temperature=1.0, top_k=2), [0.625, 0.375, 0, 0], atol=0.03)
    np.testing.assert_allclose(frequencies(temperature=1.0, top_p=0.75), [0.625, 0.375, 0, 0], atol=0.03)
    hot = frequencies(temperature=4.0)
    assert hot[3] > 0.15 and hot[0] < 0.4  # flatter than the model's distribution
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(bn.InvalidValueError):
            Sampler(**bad)


def test_bad_input_ids(model):
    with pytest.raises(bn.ShapeError):
        model.forward(np.zeros((2, 3), np.int64))
    with pytest.raises(bn.ShapeError):
        model.forward([])
    with pytest.raises(bn.DTypeError):
        model.forward(np.array([1.5]))
    with pytest.raises(bn.InvalidValueError, match="token ids must lie"):
        model.forward([model.config.vocab_size])


def _decode_steps(model, steps):
    cache = model.new_cache(64)
    logits = model.forward(PROMPT, cache, last_only=True)
    token = np.zeros(1, np.int64)
    for _ in range(steps):
        token[0] = int(np.argmax(logits[0]))
        model.forward(token, cache, out=logits)
    return cache, logits, token


def test_decode_steps_allocate_no_new_buffers_after_the_first():
    config = bn.BitNetConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, eos_token_id=None)
    model = bn.models.random_model(config, head_dtype="bf16")
    arena = bn.default_arena()
    cache, logits, token = _decode_steps(model, 2)
    misses = arena.miss_count()
    for _ in range(5):
        token[0] = int(np.argmax(logits[0]))
        model.forward(token, cache, out=logits)
    assert arena.miss_count() == misses  # every temporary came back from the arena's pool
    tracemalloc.start()
    try:
        for _ in range(3):
            token[0] = int(np.argmax(logits[0]))
            model.forward(token, cache, out=logits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Outside the arena a step allocates only small bookkeeping (Python objects, the matmul's
    # int8 activation row): nothing like a logits row (32 KiB here), a KV-cache copy or a table.
    assert peak < 16 * 1024, peak


def test_bench_model_reports_rates_bandwidth_and_overhead():
    from bitnet.models.bench import bench_model

    config = bn.BitNetConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    result = bench_model(bn.models.random_model(config, head_dtype="int8"), prompt_tokens=8, decode_tokens=4,
                         context=5, repeats=2, read_bytes=2**20)
    assert len(result.prefill_seconds) == len(result.decode_seconds) == len(result.read_bytes_per_second) == 2
    assert len(result.step_seconds) == 8 and len(result.kernel_seconds) == 2
    for spread in (result.prefill_tokens_per_second, result.decode_tokens_per_second, result.read_bandwidth,
                   result.bound_tokens_per_second, result.bound_fraction):
        assert 0 < spread.low <= spread.median <= spread.high
    assert result.step_bytes.kv_cache == 2 * 2 * 2 * 16 * 4 * (5 + 2.5)  # 7.5 positions attended on average
    assert 0 <= result.overhead_share <= 1 and 0 < result.python_share <= 1
    assert result.peak_rss_bytes > 0


def test_overhead_share_sets_each_runs_kernels_against_that_runs_steps():
    from bitnet.models.bench import BenchResult, StepBytes

    # Run 1: steps of 1 s, kernels 0.5 s (half outside them); run 2: steps of 2-4 s (median 2), kernels
    # 1.5 s (a quarter outside). Pooled, the kernels' median (1.0) over the steps' (1.5) would say a third.
    result = BenchResult(8, 4, 0, [1.0, 1.0], [4.0, 10.0], [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 4.0], [1e9, 1e9],
                         StepBytes(1, 1, 0.0), [0.5, 1.5], 0.01, 1)
    assert result.overhead_share == (0.5 + 0.25) / 2
    assert result.kernel_seconds_per_step == 1.0


def test_decode_step_bytes_are_the_projections_the_head_and_the_attended_cache():
    from bitnet.models.bench import decode_step_bytes

    layers, hidden, inter, heads, kv_heads, vocab = 3, 256, 512, 4, 2, 300
    config = bn.BitNetConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads)
    head_dim = hidden // heads
    # i2: 2 bits a weight; the stacked q/k/v and gate/up projections keep each part's float32 scale
    # per row, o and down one scale. The int8 head: one byte a weight plus a float32 scale per row,
    # its rows padded to 16 where the kernels read them 16 to a vector.
    qkv_rows, gate_up_rows = hidden + 2 * kv_heads * head_dim, 2 * inter
    ternary = layers * (qkv_rows * hidden // 4 + 4 * qkv_rows + hidden * hidden // 4 + 4
                        + gate_up_rows * hidden // 4 + 4 * gate_up_rows + hidden * inter // 4 + 4)
    int8_rows = -(-vocab // 16) * 16 if bn.ops.KERNEL_PATH in LANES_PATHS else vocab
    for dtype, head in (("int8", int8_rows * hidden + 4 * vocab), ("f32", 4 * vocab * hidden)):
        step = decode_step_bytes(bn.models.random_model(config, head_dtype=dtype), positions=10)
        assert step.ternary == ternary
        assert step.head == head
        assert step.kv_cache == 2 * layers * kv_heads * head_dim * 4 * 10
        assert step.total == step.ternary + step.head + step.kv_cache


def test_bench_model_refuses_lengths_past_the_context():
    from bitnet.models.bench import check_lengths

    config = bn.BitNetConfig(max_position_embeddings=128)
    check_lengths(config, 128, 28, 100)
    for prompt, decode, context in ((129, 1, 0), (8, 29, 100)):
        with pytest.raises(bn.InvalidValueError, match="max_position_embeddings"):
            check_lengths(config, prompt, decode, context)


@pytest.mark.slow
def test_cli_bench_model_one_layer(capsys):
    from bitnet.cli import main

    assert main(["bench-model", "--layers", "1", "--head", "int8", "--prompt-tokens", "4", "--decode-tokens", "2",
                 "--repeats", "2", "--context", "3", "4100"]) == 0  # past 2B4T's 4096: the rope table grows
    out = capsys.readouterr().out
    assert "int8 head" in out and "float16 KV cache" in out and "prefill: 4 tokens" in out
    assert "median (min-max) of 2 runs" in out
    shares = re.search(r"decode by context .* 3: [\d.]+ \(.*= 100% \(bytes 100%\); "
                       r"4100: [\d.]+ \(.*= \d+% \(bytes (\d+)%\)", out)
    assert shares and 0 < int(shares.group(1)) < 100  # the step at 4100 reads the cache besides the weights
    assert "decode:  2 tokens after 3 cached positions" in out and "Python overhead" in out and "peak RSS" in out
    assert re.search(r"DRAM read: [\d.]+ \([\d.]+-[\d.]+\) GB/s", out)
    assert re.search(r"bound [\d.]+ \([\d.]+-[\d.]+\) tok/s, reached \d+% \(\d+-\d+%\)", out)


def test_decode_by_context_times_each_context_in_every_round():
    from bitnet.models.bench import decode_by_context

    config = bn.BitNetConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = bn.models.random_model(config, head_dtype="int8")
    model.kv_dtype = "float16"
    stages = []
    rates = decode_by_context(model, [40, 0, 9, 9], decode_tokens=3, repeats=2, progress=stages.append)
    assert list(rates) == [0, 9, 40] and all(0 < r.low <= r.median <= r.high for r in rates.values())
    assert [stage for stage in stages if "decode steps" in stage] == [
        f"round {r} of 2: 3 decode steps after each of 0, 9, 40 cached positions, in turns" for r in (1, 2)]
    with pytest.raises(bn.InvalidValueError, match="max_position_embeddings"):
        decode_by_context(model, [62], decode_tokens=3)


def test_a_cache_of_another_model_is_refused_before_anything_runs(model):
    c = model.config
    others = [bn.nn.KVCache(c.num_hidden_layers, c.num_key_value_heads + 1, c.head_dim),  # more KV heads
              bn.nn.KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim // 2),  # another head_dim
              bn.nn.KVCache(c.num_hidden_layers - 1, c.num_key_value_heads, c.head_dim)]  # fewer layers
    if c.num_key_value_heads > 1:
        others.append(bn.nn.KVCache(c.num_hidden_layers, c.num_key_value_heads - 1, c.head_dim))  # fewer KV heads
    for cache in others:
        with pytest.raises(bn.ShapeError, match="new_cache"):
            model.forward(PROMPT, cache)
        assert cache.length == 0
    with pytest.raises(bn.DTypeError):
        model.forward(PROMPT, cache={})


def test_a_cache_checked_once_is_still_checked_where_it_can_change(model):
    """The model checks a cache's arrays once per layout (not every step), and its length every step."""
    cache = model.new_cache(len(PROMPT) + 1)
    model.forward(PROMPT, cache)
    model.forward(PROMPT[:1], cache)  # fills the capacity: no room left
    cache.length = cache.capacity + 1
    with pytest.raises(bn.ShapeError, match="capacity"):
        model.forward(PROMPT[:1], cache)
    cache.length = len(PROMPT) + 1
    cache.dtype = "float16"  # the arrays stay float32: a new layout, checked in full
    with pytest.raises(bn.ShapeError, match="new_cache"):
        model.forward(PROMPT[:1], cache)
    cache.dtype = "float32"
    half = model.forward(PROMPT[:1], cache)  # grows: the new arrays are checked
    assert cache.capacity > len(PROMPT) + 1 and np.isfinite(half).all()
    cache.release()
    with pytest.raises(bn.InvalidValueError, match="released"):
        model.forward(PROMPT[:1], cache)


def test_forward_checks_out_before_running(model):
    cache = model.new_cache()
    for out in (np.empty((1, model.config.vocab_size + 1), np.float32), np.empty((1, model.config.vocab_size)),
                np.empty((len(PROMPT), model.config.vocab_size), np.float32)):
        with pytest.raises(bn.BitNetError, match="out"):
            model.forward(PROMPT, cache, last_only=True, out=out)
    assert cache.length == 0  # nothing ran, the cache did not move


def _context_model(context):
    config = bn.BitNetConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                             eos_token_id=None, bos_token_id=None)
    return bn.models.random_model(config, head_dtype="f32")


def test_generation_past_the_context_is_refused_and_the_cache_grows_as_tokens_come():
    model = _context_model(16)
    prompt = np.arange(6)
    with pytest.raises(bn.InvalidValueError, match=r"context of 16 \(config.max_position_embeddings\).*at most 10"):
        model.generate(prompt, 11)
    with pytest.raises(bn.InvalidValueError, match="context of 16"):
        model.stream(prompt, 10**9)  # refused when called, before a 10**9-position cache is even thought of
    assert len(model.generate(prompt, 10)) == 10
    cache = model.new_cache(capacity=2)
    model.forward(np.arange(16) % 50, cache)
    assert cache.capacity == 16  # doubling stopped at the context
    with pytest.raises(bn.InvalidValueError, match="context of 16"):
        model.forward([1], cache)
    assert model.new_cache(10**9).capacity == 16
    with pytest.raises(bn.InvalidValueError, match="at most 16"):
        cache.reserve(17)


def test_a_forward_without_a_cache_past_the_context_is_refused_before_it_writes():
    # It made a cache of the context's capacity and wrote the position past it: heap corruption,
    # found by the slow HF fuzz (a config.json with max_position_embeddings=3, a forward of 4 ids).
    model = _context_model(3)
    with pytest.raises(bn.InvalidValueError, match="4 positions exceed the model's context of 3"):
        model(np.arange(4))
    whole = model(np.arange(3))
    cache = model.new_cache()
    assert np.array_equal(whole, model.forward(np.arange(3), cache)) and cache.length == 3


def test_attention_rows_refuse_a_cache_without_room_for_them():
    # The kernels write each row's keys and values at its position unchecked: the rows check first.
    cache = bn.nn.KVCache(layers=1, kv_heads=2, head_dim=16, capacity=4)
    cache.length = 3
    with pytest.raises(bn.ShapeError, match=r"3 plus 2 new positions must fit its capacity 4"):
        CacheRows([(cache, slice(0, 2))])
    assert CacheRows([(cache, slice(0, 1))]).end == 4


def test_a_large_max_new_tokens_allocates_only_what_is_generated():
    model = _context_model(1 << 20)
    prompt = PROMPT % 50
    stop = model.generate(prompt, 3)[-1]
    tracemalloc.start()
    try:
        tokens = model.generate(prompt, (1 << 20) - len(prompt), stop=[stop])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tokens[-1] == stop and len(tokens) <= 3
    # The whole cache would be 2 x 2 heads x 2**20 x 16 x 4 bytes = 512 MiB; what ran needs a few hundred KiB.
    assert peak < 4 << 20, peak


@pytest.mark.parametrize("bad", [
    dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-0.5), dict(temperature="1"),
    dict(top_k=0), dict(top_k=2.5), dict(top_k=True), dict(top_p=float("nan")), dict(top_p=0.0), dict(top_p="0.9"),
    dict(seed=-1), dict(seed=1.5), dict(seed="7"), dict(stop=[1.5]), dict(stop=[130]), dict(stop=[-1]),
    dict(stop=5), dict(stop=["a"]), dict(max_new_tokens=-1), dict(max_new_tokens=2.0), dict(max_new_tokens=True),
    dict(first_tokens=[]), dict(first_tokens=[999]), dict(callback=3),
], ids=lambda bad: "-".join(f"{k}={v!r}" for k, v in bad.items()))
def test_bad_generation_arguments_raise_before_any_work(model, bad):
    arguments = dict(max_new_tokens=4, **bad) if "max_new_tokens" not in bad else bad
    with pytest.raises(bn.BitNetError):
        model.generate(PROMPT, **arguments)
    if "callback" not in bad:
        with pytest.raises(bn.BitNetError):
            model.stream(PROMPT, **arguments)  # raised by the call itself, not by the first next()
    assert model.generate(PROMPT, 0) == []


def _greedy_by_batch(model, prompts, steps):
    """Greedy continuations of ``prompts`` decoded together: one forward_batch per step for all of them."""
    caches = [model.new_cache(arena=bn.Arena()) for _ in prompts]
    logits = model.forward_batch([np.asarray(p) for p in prompts], caches)
    tokens = [[int(np.argmax(row))] for row in logits]
    for _ in range(steps - 1):
        logits = model.forward_batch([np.array(t[-1:]) for t in tokens], caches)
        for row, t in zip(logits, tokens, strict=True):
            t.append(int(np.argmax(row)))
    return tokens, caches


def test_forward_batch_rows_equal_each_sequence_alone(model):
    prompts = [PROMPT, PROMPT[:1], (PROMPT * 7 + 1) % model.config.vocab_size, np.arange(17) % 100]
    caches = [model.new_cache() for _ in prompts]
    logits = model.forward_batch(prompts, caches)
    for prompt, row, cache in zip(prompts, logits, caches, strict=True):
        assert_same_logits(row, model.forward(prompt, last_only=True)[0])
        assert cache.length == len(prompt)
    tokens, _ = _greedy_by_batch(model, prompts, 8)
    assert tokens == [model.generate(p, 8) for p in prompts]


def test_forward_batch_checks_everything_before_running(model):
    a, b = model.new_cache(), model.new_cache()
    vocab = model.config.vocab_size
    for sequences, caches in (([PROMPT], [a, b]), ([], []), ([PROMPT, PROMPT], [a, a]), ([PROMPT, [vocab]], [a, b]),
                              ([PROMPT, []], [a, b]), (PROMPT, [a]), ([PROMPT, PROMPT], [a, None])):
        with pytest.raises(bn.BitNetError):
            model.forward_batch(sequences, caches)
        assert a.length == b.length == 0
    with pytest.raises(bn.BitNetError, match="out"):
        model.forward_batch([PROMPT, PROMPT], [a, b], out=np.empty((1, vocab), np.float32))


def test_float16_cache_decodes_as_its_full_forward_and_stays_near_float32(model):
    model.kv_dtype = "float16"
    try:
        cache = model.new_cache(capacity=4)
        assert cache.keys[0].dtype == np.float16
        ids = np.arange(40) % model.config.vocab_size
        model.forward(ids[:-1], cache)
        assert_same_logits(model.forward(ids[-1:], cache)[0], model.forward(ids)[-1])
        half = model.forward(ids)
    finally:
        model.kv_dtype = "float32"
    full = model.forward(ids)
    assert 0 < np.abs(half - full).max() <= 2e-2 * np.abs(full).max()  # rounded, and near (an int8 code may flip)
    with pytest.raises(bn.InvalidValueError, match="kv_dtype"):
        model.kv_dtype = "bfloat16"


def test_caches_from_an_arena_go_back_to_it(model):
    arena = bn.Arena()
    caches = [model.new_cache(8, arena=arena) for _ in range(3)]
    model.forward_batch([PROMPT, PROMPT[:2], PROMPT[:4]], caches)
    model.forward_batch([PROMPT] * 3, caches)  # grows each cache (6 + 6 > 8 positions)
    assert arena.used_bytes() > 0 and all(c.capacity == 16 for c in caches[::2])
    for cache in caches:
        cache.release()
    assert arena.used_bytes() == 0
    with pytest.raises(bn.InvalidValueError, match="released"):
        model.forward(PROMPT, caches[0])


CACHED_BUILD_SCRIPT = f"""
import hashlib, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import numba, numpy as np
import bitnet as bn
from bitnet.models.random import random_model
from kernel_builds import built_not_loaded

bn.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
config = bn.BitNetConfig(vocab_size=300, hidden_size=256, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=20, num_key_value_heads=5, head_dim=128, bos_token_id=None,
                         eos_token_id=None)
model = random_model(config, 0, head_dtype="int8")
rng = np.random.default_rng(0)
digest = hashlib.sha256()
for kv_dtype in ("float16", "float32"):
    model.kv_dtype = kv_dtype
    caches = [model.new_cache(300) for _ in range(3)]  # 2 chunks of positions a decode row
    digest.update(model.forward_batch([rng.integers(0, 300, n) for n in (70, 5, 1)], caches).tobytes())
    for _ in range(2):  # one row alone under 64 positions: the one-thread kernels
        digest.update(model.forward_batch([rng.integers(0, 300, 1) for _ in caches], caches).tobytes())
        digest.update(model.forward(rng.integers(0, 300, 1), caches[2]).tobytes())
print(digest.hexdigest())
print(sorted(built_not_loaded()))
"""


THREADED_CALLER_SCRIPT = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import numpy as np
from kernel_builds import built_not_loaded
from bitnet.kernels import attention
from bitnet.kernels.cpu_features import selected_path
from bitnet.kernels.simd import MARKERS

path = selected_path()
rng = np.random.default_rng(0)
keys, values = (rng.standard_normal((1, 70, 16)).astype(np.float32) for _ in range(2))
rows, tables, template = attention.single_sequence(keys, values, 69, 1)
scratch = [np.zeros(shape, np.float32)
           for shape in attention.scratch_shapes(1, int(rows[:, 3].min()), 4, 1, 16, 70).values()]
queries = rng.standard_normal((1, 4, 16)).astype(np.float32)
out = np.zeros((1, 64), np.float32)
if sys.argv[1] == "callee":  # the threaded kernel alone, called from Python
    attention.parallel.causal_attention(MARKERS[path], queries, rows, tables, 0, template, 0.25, *scratch, out)
else:  # the path's entry point: a serial function whose code calls the threaded kernel
    attention.ENTRY_POINTS[path, True](queries, rows, tables, 0, template, 0.25, *scratch, out)
print(out.tobytes().hex())
print(sorted(name for _, name, _ in built_not_loaded()))
"""


def test_a_serial_caller_of_threaded_code_runs_when_loaded_from_numbas_cache(tmp_path):
    """Three fresh processes on one empty on-disk cache: the first compiles the threaded attention kernel,
    the second its entry point (a serial function that links it, compiled against the cached kernel),
    the third loads that entry. Numba then forgets that the entry needs its thread pool started, and
    the third process segfaulted (numba#8578) until importing the kernels started the pool."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", THREADED_CALLER_SCRIPT, which], capture_output=True, text=True,
                           env=env) for which in ("callee", "entry", "entry")]
    assert [run.returncode for run in runs] == [0, 0, 0], runs[-1].stderr[-2000:]
    results, built = zip(*(run.stdout.splitlines() for run in runs), strict=True)
    assert results[0] == results[1] == results[2]
    assert "_parallel_attention" in built[0] and built[1] == "['ENTRY_POINTS']" and built[2] == "[]"


def test_a_build_loaded_from_numbas_cache_computes_the_bits_of_a_fresh_one(tmp_path):
    """Two fresh processes on one empty on-disk cache: the first compiles every kernel, the second loads
    them all (compiles nothing) and gets the same logits, bit for bit. A threaded attention kernel
    loaded from the cache once summed its softmax in another order than its fresh build did."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", CACHED_BUILD_SCRIPT], capture_output=True, text=True, check=True,
                           env=env).stdout.splitlines() for _ in range(2)]
    assert runs[0][1] != "[]"  # the first process did compile
    assert runs[1][0] == runs[0][0]
    assert runs[1][1] == "[]"

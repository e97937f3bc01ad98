"""The scheduler and engine behind the server, without HTTP: every sequence of a batch gets exactly the
tokens ``model.generate`` gives it alone, whoever else shares its steps, and every cache goes back."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import bitnet as bn
from bitnet.models.sampling import Sampler
from bitnet.serve import Engine, Output, Scheduler, Sequence


@pytest.fixture(scope="module")
def model():
    return bn.load_pretrained()


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(1)
    # Lengths on both sides of the prefill chunks used below (16), one far past them.
    return [rng.integers(1, model.config.vocab_size, n).tolist() for n in (3, 16, 17, 40, 150)]


class Collector:
    """The outputs of one sequence, as the engine thread emits them."""

    def __init__(self) -> None:
        self.outputs: list[Output] = []
        self.done = threading.Event()

    def __call__(self, output: Output) -> None:
        self.outputs.append(output)
        if output.last:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [o.token for o in self.outputs if o.token is not None]


def test_batched_greedy_and_sampled_tokens_equal_generate(model, prompts, monkeypatch):
    """Five sequences through three slots, prompts prefilled in 16-token chunks: each equals generate()."""
    settings = [dict(), dict(temperature=0.8, top_p=0.9, seed=5), dict(), dict(temperature=1.2, top_k=40, seed=1),
                dict()]
    max_tokens = [30, 25, 40, 20, 35]
    expected = [model.generate(p, n, **s) for p, n, s in zip(prompts, max_tokens, settings, strict=True)]
    arena = bn.Arena()
    scheduler = Scheduler(model, max_batch=3, prefill_chunk=16, arena=arena)
    sizes = []
    forward_batch = model.forward_batch

    def recorded(sequences, caches):
        sizes.append(sum(map(len, sequences)))
        return forward_batch(sequences, caches)

    monkeypatch.setattr(model, "forward_batch", recorded)
    collectors = [Collector() for _ in prompts]
    for p, n, s, c in zip(prompts, max_tokens, settings, collectors, strict=True):
        scheduler.add(Sequence(p, n, Sampler(**s), c, model.config.stop_token_ids))
    while scheduler.busy:
        scheduler.step()
    for c, tokens in zip(collectors, expected, strict=True):
        assert c.tokens == tokens
        assert c.outputs[-1].finish_reason == ("stop" if tokens[-1] in model.config.stop_token_ids else "length")
        assert [o.completion_tokens for o in c.outputs] == list(range(1, len(tokens) + 1))
    assert max(sizes) <= 16 + 3  # one prompt chunk plus a token for each other running sequence
    assert arena.used_bytes() == 0  # every KV cache went back


def test_a_long_prompt_does_not_stall_running_sequences(model, prompts):
    """While a 150-token prompt is read 16 tokens a step, the running sequence gets a token every step."""
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=16, arena=bn.Arena())
    short, long = Collector(), Collector()
    scheduler.add(Sequence(prompts[0], 40, Sampler(), short, ()))
    scheduler.step()
    assert len(short.outputs) == 1
    scheduler.add(Sequence(prompts[4], 5, Sampler(), long, ()))
    for step in range(1, 10):  # ceil(150 / 16) = 10 steps to read the long prompt
        scheduler.step()
        assert len(short.outputs) == 1 + step and not long.outputs
    scheduler.step()
    assert len(long.outputs) == 1 and len(short.outputs) == 11


def test_cancelled_sequences_leave_and_free_their_cache(model, prompts):
    arena = bn.Arena()
    scheduler = Scheduler(model, max_batch=1, arena=arena)
    running, waiting = Collector(), Collector()
    first, second = (Sequence(p, 50, Sampler(), c, ()) for p, c in ((prompts[0], running), (prompts[1], waiting)))
    scheduler.add(first)
    scheduler.add(second)
    scheduler.step()
    assert arena.used_bytes() > 0
    first.cancel()
    second.cancel()
    assert scheduler.step() == [second, first]
    assert not scheduler.busy and arena.used_bytes() == 0
    assert len(running.outputs) == 1 and not waiting.outputs


def test_a_failing_forward_ends_its_sequences_with_the_error_and_the_engine_goes_on(model, prompts, monkeypatch):
    forward_batch = model.forward_batch

    def fails_once(sequences, caches):
        monkeypatch.undo()
        raise RuntimeError("boom")

    with Engine(model, max_batch=2) as engine:
        monkeypatch.setattr(model, "forward_batch", fails_once)
        failed = Collector()
        engine.submit(prompts[0], 5, failed)
        assert failed.done.wait(60)
        assert model.forward_batch == forward_batch
        assert str(failed.outputs[-1].error) == "boom" and failed.outputs[-1].token is None
        after = Collector()
        engine.submit(prompts[0], 5, after)
        assert after.done.wait(60) and after.tokens == model.generate(prompts[0], 5)
        assert engine.outstanding == 0


def test_engine_refuses_past_its_queue_and_context(model, prompts):
    with Engine(model, max_batch=1, max_queue=1, max_context=64) as engine:
        with pytest.raises(bn.errors.ContextLengthError, match="40 tokens plus 30 tokens to generate exceed the "
                                                                "context of 64"):
            engine.submit(prompts[3], 30, print)
        with pytest.raises(bn.InvalidValueError, match="token ids must lie in"):
            engine.submit([model.config.vocab_size], 3, print)
        with pytest.raises(bn.InvalidValueError, match="temperature"):
            engine.submit(prompts[0], 3, print, temperature=-1)
        with pytest.raises(bn.InvalidValueError, match="stop strings need a tokenizer"):
            engine.submit(prompts[0], 3, print, stop=["x"])
        accepted = [engine.submit(prompts[0], 60, Collector()) for _ in range(2)]  # one running, one waiting
        with pytest.raises(bn.errors.OverloadedError, match="1 requests running and 1 waiting"):
            engine.submit(prompts[0], 3, print)
        for sequence in accepted:
            sequence.cancel()
    with pytest.raises(bn.errors.OverloadedError, match="not running"):
        engine.submit(prompts[0], 3, print)
    with pytest.raises(bn.InvalidValueError, match="exceeds the model's context"):
        Engine(model, max_context=model.config.max_position_embeddings + 1)


def test_closing_the_engine_ends_waiting_requests_with_an_error(model, prompts):
    engine = Engine(model, max_batch=1).start()
    outputs = [Collector() for _ in range(3)]
    for c in outputs:
        engine.submit(prompts[1], 200, c)
    engine.close()
    for c in outputs:
        assert c.done.is_set() and isinstance(c.outputs[-1].error, bn.errors.OverloadedError)


def test_the_thread_creating_an_engine_hands_its_openmp_workers_back(model, monkeypatch):
    calls = []
    monkeypatch.setattr("bitnet.serve.engine.release_worker_threads", lambda: calls.append(threading.get_ident()))
    Engine(model)
    assert calls == [threading.get_ident()]  # the creating thread's pool; the engine thread then runs the kernels


WARM_UP_SCRIPT = f"""
import sys, threading
sys.path.insert(0, {str(Path(__file__).parent)!r})
import bitnet as bn
from bitnet.serve import Engine
from kernel_builds import compiled

model = bn.load_pretrained()
with Engine(model) as engine:
    before = compiled()
    done = threading.Event()
    engine.submit([1, 2, 3], 4, lambda output: output.last and done.set())
    done.wait()
    print(sorted(compiled() - before))
"""


def test_the_warm_up_compiles_every_kernel_a_short_request_runs():
    """A fresh process: after ``start`` a request compiles nothing more (its first tokens would wait seconds)."""
    done = subprocess.run([sys.executable, "-c", WARM_UP_SCRIPT], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

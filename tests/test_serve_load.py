"""Bounded load on localhost: 1, 4 and 16 concurrent streaming clients all get their whole response, memory
goes back to its idle level, a full server answers 503, and clients that hang up mid-stream free their slots.
(How fast it serves is measured by benchmarks/serve_load.py, not here.)"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from serve_helpers import API_KEY, MODEL_NAME, running_server, wait_until  # noqa: E402

MAX_BATCH, MAX_QUEUE = 8, 8
MAX_TOKENS = 48
RSS_TOLERANCE = 32 * 2**20  # a second round of the same load may not grow the process by more than this


@pytest.fixture(scope="module")
def server():
    with running_server(max_batch=MAX_BATCH, max_queue=MAX_QUEUE) as running:
        yield running


@pytest.fixture(scope="module")
def expected(server):
    """Each client's prompt and the greedy text ``model.generate`` gives it (computed before any load)."""
    prompts = [f"def function_{i}(x, y):\n    return x {'+-*/%'[i % 5]} " for i in range(16)]
    texts = []
    for prompt in prompts:
        tokens = server.model.generate(server.tokenizer.encode(prompt).ids, MAX_TOKENS)
        stop_ids = server.model.config.stop_token_ids
        texts.append(server.tokenizer.decode(tokens[:-1] if tokens[-1] in stop_ids else tokens))
    return list(zip(prompts, texts, strict=True))


def resident_bytes() -> int:
    statm = Path("/proc/self/statm")
    if not statm.exists():
        pytest.skip("resident memory is read from /proc/self/statm (Linux)")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def stream_all(url: str, prompts: list[str]) -> list[tuple[str, str | None, int]]:
    """Stream one completion per prompt, all at once: ``(text, finish_reason, completion tokens)`` each."""
    client = openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)

    async def one(prompt: str) -> tuple[str, str | None, int]:
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
        text, finish, tokens = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


@pytest.mark.parametrize("clients", [1, 4, 16])
def test_concurrent_streams_complete_and_memory_returns_to_idle(server, expected, clients):
    arena = server.engine.scheduler.arena
    idle_used = arena.used_bytes()
    chosen = expected[:clients]
    rss = []
    for _ in range(2):  # the first round warms the arena's pools up; the second may not grow the process
        results = asyncio.run(stream_all(server.url, [p for p, _ in chosen]))
        for (_, text), (got, finish, tokens) in zip(chosen, results, strict=True):
            assert got == text and finish in ("stop", "length") and tokens > 0
        assert wait_until(lambda: server.engine.outstanding == 0)
        assert arena.used_bytes() == idle_used
        rss.append(resident_bytes())
    assert rss[1] - rss[0] < RSS_TOLERANCE


def test_a_full_server_answers_503_and_hung_up_clients_free_their_slots(server, expected, monkeypatch):
    """16 streams fill the 8 slots and the 8 places in the queue; the 17th request is refused. The clients
    hang up after their first token: every request ends long before its 240 tokens, and the server serves on."""
    forward_batch = server.model.forward_batch

    def slow(sequences, caches, out=None):  # 10 ms a step: 240 tokens would take seconds, a hang-up milliseconds
        time.sleep(0.01)
        return forward_batch(sequences, caches, out)

    monkeypatch.setattr(server.model, "forward_batch", slow)
    idle_used = server.engine.scheduler.arena.used_bytes()
    client = server.client()
    first_step = len(server.batch_sizes)
    streams = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=240, temperature=0, stream=True)
               for p, _ in expected[: MAX_BATCH + MAX_QUEUE]]
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model=MODEL_NAME, prompt="one too many", max_tokens=5)
    assert caught.value.status_code == 503 and caught.value.code == "overloaded"
    assert caught.value.response.headers["retry-after"] == "1"
    for stream in streams[:MAX_BATCH]:  # the running ones have tokens to read
        next(iter(stream))
    for stream in streams:
        stream.close()
    assert wait_until(lambda: server.engine.outstanding == 0, 20)
    assert server.engine.scheduler.arena.used_bytes() == idle_used
    steps = len(server.batch_sizes) - first_step
    assert steps < 240  # without the hang-ups: at least 2 x 240 steps (16 sequences, 8 at a time)
    prompt, text = expected[0]
    response = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert response.choices[0].text == text


def test_a_client_that_gives_up_on_a_whole_response_frees_its_slot(server, monkeypatch):
    """A non-streamed request whose client times out is cancelled too, long before its 240 tokens."""
    forward_batch = server.model.forward_batch

    def slow(sequences, caches, out=None):
        time.sleep(0.01)
        return forward_batch(sequences, caches, out)

    monkeypatch.setattr(server.model, "forward_batch", slow)
    first_step = len(server.batch_sizes)
    with pytest.raises(openai.APITimeoutError):
        server.client(timeout=0.3).completions.create(model=MODEL_NAME, prompt="def f(x):", max_tokens=240)
    assert wait_until(lambda: server.engine.outstanding == 0, 20)
    assert len(server.batch_sizes) - first_step < 120

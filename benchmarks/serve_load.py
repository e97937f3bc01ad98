"""Throughput and latency of the server under concurrent streaming clients (a benchmark, not a test).

Serves a random-weight model of the BitNet b1.58 2B4T shapes (int8 head) in this process,
as ``python -m bitnet serve`` would (uvicorn, the OpenAI API, continuous batching with
``--max-batch`` at least the most concurrent requests), and for 1, 2, 4, 8 and 16 concurrent
clients, each streaming one greedy completion of a different random prompt, reports:

* aggregate decode tokens/s: the tokens all clients received while every one of them was
  decoding (after the last first token, before the first last token), over that window;
* per-token latency: the median gap between a client's tokens in that window (median over clients);
* time to first token and whole-request latency (medians over clients; prefill is chunked);
* the aggregate speedup and the per-token latency over those of one client;
* for comparison, one bare ``model.forward_batch`` decode step of that many sequences (median
  of 9, after the server has stopped): what the kernels cost, without the server around them.

The random model has no tokenizer: a word-level one over its 128256 ids ("t0" .. "t128255")
decodes the streamed text, and prompts go in as token ids. EOS is off, so every request
generates exactly ``--max-tokens``. Each setting runs ``--repeats`` times; figures are medians.

    python benchmarks/serve_load.py --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import numpy as np

import bitnet as bn
from bitnet.io.chat import chat_format
from bitnet.models.random import random_model
from bitnet.serve import Engine, create_app, running

MODEL_NAME = "random-2b4t"


def word_tokenizer(vocab_size: int):
    """A ``tokenizers.Tokenizer`` whose token ``i`` is the word ``t<i>``: decodes any id of the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tokenizer


async def one_request(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    """Stream one completion; the arrival time of each token's chunk and the token count."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert tokens == max_tokens == len(stamps), (tokens, max_tokens, len(stamps))  # one chunk per word token
    return {"start": start, "stamps": stamps}


async def run_clients(url: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 1)
    async with httpx.AsyncClient(limits=limits) as client:
        return await asyncio.gather(*(one_request(client, url, p, max_tokens) for p in prompts))


def figures(results: list[dict]) -> dict[str, float]:
    """The run's figures from each client's token arrival times."""
    window_start = max(r["stamps"][0] for r in results)
    window_end = min(r["stamps"][-1] for r in results)
    in_window = [np.array([t for t in r["stamps"] if window_start <= t <= window_end]) for r in results]
    decoded = sum(len(s) - 1 for s in in_window)  # gaps, not stamps: each client's first stamp opens its window
    gaps = [np.median(np.diff(s)) for s in in_window if len(s) > 1]
    return {
        "aggregate_tok_s": decoded / (window_end - window_start) if window_end > window_start else float("nan"),
        "per_token_ms": 1e3 * float(np.median(gaps)) if gaps else float("nan"),
        "first_token_s": statistics.median(r["stamps"][0] - r["start"] for r in results),
        "request_s": statistics.median(r["stamps"][-1] - r["start"] for r in results),
    }


def bare_step_ms(model, sequences: int, rng: np.random.Generator, prompt_tokens: int) -> float:
    """The median time of a decode step of ``sequences`` sequences through ``forward_batch`` alone."""
    caches = [model.new_cache(prompt_tokens + 16) for _ in range(sequences)]
    model.forward_batch([rng.integers(0, model.config.vocab_size, prompt_tokens) for _ in caches], caches)
    times = []
    for _ in range(9):
        start = time.perf_counter()
        model.forward_batch([np.zeros(1, np.int64)] * sequences, caches)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (2B4T has 30)")
    parser.add_argument("--threads", type=int, default=2, help="numba threads of the engine")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="concurrent clients, comma-separated")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens of each random prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each client streams")
    parser.add_argument("--prefill-chunk", type=int, default=64, help="as serve --prefill-chunk")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting; figures are medians")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]

    config = bn.BitNetConfig(num_hidden_layers=args.layers, bos_token_id=None, eos_token_id=None)
    started = time.perf_counter()
    model = random_model(config, args.seed, head_dtype="int8")
    tokenizer = word_tokenizer(config.vocab_size)
    print(f"model: {args.layers} layers of 2B4T shapes, int8 head, built in {time.perf_counter() - started:.0f} s; "
          f"{args.threads} threads; prompts of {args.prompt_tokens} tokens, {args.max_tokens} streamed each; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    engine = Engine(model, tokenizer, max_batch=max(concurrency), max_queue=max(concurrency),
                    prefill_chunk=args.prefill_chunk, threads=args.threads)
    app = create_app(engine, tokenizer, chat_format(None, tokenizer, config), MODEL_NAME)
    rng = np.random.default_rng(args.seed)
    rows = {}
    with running(app) as url:
        for _ in range(args.repeats):  # the settings alternate, so a change of machine load hits all alike
            for n in concurrency:
                prompts = [rng.integers(0, config.vocab_size, args.prompt_tokens).tolist() for _ in range(n)]
                rows.setdefault(n, []).append(figures(asyncio.run(run_clients(url, prompts, args.max_tokens))))
    bn.set_num_threads(args.threads)
    bare = {n: bare_step_ms(model, n, rng, args.prompt_tokens) for n in concurrency}
    base = {key: statistics.median(run[key] for run in rows[concurrency[0]]) for key in rows[concurrency[0]][0]}
    print(f"{'clients':>7} {'aggregate tok/s':>16} {'x one':>6} {'ms/token':>9} {'x one':>6} {'first token s':>14} "
          f"{'request s':>10} {'bare step ms':>13}")
    for n, runs in rows.items():
        m = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"{n:>7} {m['aggregate_tok_s']:>16.1f} {m['aggregate_tok_s'] / base['aggregate_tok_s']:>6.2f} "
              f"{m['per_token_ms']:>9.1f} {m['per_token_ms'] / base['per_token_ms']:>6.2f} "
              f"{m['first_token_s']:>14.2f} {m['request_s']:>10.2f} {bare[n]:>13.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

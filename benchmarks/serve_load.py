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
* the clients' CPU time per token received (their process's, see below);
* for comparison, one bare ``model.forward_batch`` decode step of that many sequences (median
  of 9, after the server has stopped): what the kernels cost, without the server around them.

The clients run in a process of their own (this script with ``--clients-process``), as real
clients run outside the server: in the server's process their asyncio loop would take the
GIL from the engine thread between kernels and its CPU from the Numba threads during them,
which added 4-10 ms to a step of 8 here (``--clients-in-process`` keeps them there, for
comparison). Their CPU time is reported, since on a small machine they still share its cores.

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
import subprocess
import sys
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


async def _post(host: str, port: int, path: str, body: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send an HTTP/1.1 POST of ``body`` as JSON; the connection, read past the response's headers
    (status 200 checked). Keep the writer until the body is read: collected, it closes the connection.

    A few lines of asyncio instead of an HTTP client library: on a 2-core machine the clients'
    CPU is taken from the server's, and httpx took ~0.5 ms of it per streamed token.
    """
    reader, writer = await asyncio.open_connection(host, port)
    payload = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    status = await reader.readline()
    assert status.split()[1] == b"200", status
    while (await reader.readline()).strip():  # the headers (the body comes chunked: Transfer-Encoding)
        pass
    return reader, writer


async def _events(reader: asyncio.StreamReader):
    """The server-sent events of a chunked response body, each as its ``data`` line's text, as they arrive."""
    pending = b""
    while size := int((await reader.readline()).strip(), 16):
        pending += (await reader.readexactly(size + 2))[:-2]  # a chunk, then CRLF
        *complete, pending = pending.split(b"\n\n")
        for event in complete:
            if event.startswith(b"data: "):
                yield event[6:].decode()


async def one_request(url: str, prompt: list[int], max_tokens: int) -> dict:
    """Stream one completion; the arrival time of each token's chunk and the token count."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    host, port = url.removeprefix("http://").rsplit(":", 1)
    start = time.perf_counter()
    stamps, tokens = [], 0
    reader, writer = await _post(host.strip("[]"), int(port), "/v1/completions", body)
    async for data in _events(reader):
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        if chunk["choices"] and chunk["choices"][0]["text"]:
            stamps.append(time.perf_counter())
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    writer.close()
    assert tokens == max_tokens == len(stamps), (tokens, max_tokens, len(stamps))  # one chunk per word token
    return {"start": start, "stamps": stamps}


async def run_clients(url: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    return await asyncio.gather(*(one_request(url, p, max_tokens) for p in prompts))


def clients_elsewhere(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[dict], float]:
    """``run_clients`` in a child process (this script, ``--clients-process``): its results, and the CPU
    seconds the clients took there (their run only, not the child's start).

    Arrival times are ``time.perf_counter`` stamps of the child: the figures compare stamps of
    one process only.
    """
    child = subprocess.run([sys.executable, __file__, "--clients-process"], stdout=subprocess.PIPE, text=True,
                           input=json.dumps([url, prompts, max_tokens]), check=True)
    reply = json.loads(child.stdout)
    return reply["results"], reply["cpu_s"]


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
    parser.add_argument("--clients-in-process", action="store_true",
                        help="run the clients on the server's own asyncio loop thread, not in a process of their own")
    parser.add_argument("--clients-process", action="store_true", help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args()
    if args.clients_process:  # a child of clients_elsewhere: run the clients it reads, print their results
        url, prompts, max_tokens = json.loads(sys.stdin.read())
        started = time.process_time()
        results = asyncio.run(run_clients(url, prompts, max_tokens))
        print(json.dumps({"results": results, "cpu_s": time.process_time() - started}))
        return
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
                if args.clients_in_process:
                    results, client_cpu = asyncio.run(run_clients(url, prompts, args.max_tokens)), float("nan")
                else:
                    results, client_cpu = clients_elsewhere(url, prompts, args.max_tokens)
                client_ms = 1e3 * client_cpu / (n * args.max_tokens)
                rows.setdefault(n, []).append({**figures(results), "client_cpu_ms": client_ms})
    bn.set_num_threads(args.threads)
    bare = {n: bare_step_ms(model, n, rng, args.prompt_tokens) for n in concurrency}
    base = {key: statistics.median(run[key] for run in rows[concurrency[0]]) for key in rows[concurrency[0]][0]}
    print(f"{'clients':>7} {'aggregate tok/s':>16} {'x one':>6} {'ms/token':>9} {'x one':>6} {'first token s':>14} "
          f"{'request s':>10} {'bare step ms':>13} {'client CPU ms/token':>20}")
    for n, runs in rows.items():
        m = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"{n:>7} {m['aggregate_tok_s']:>16.1f} {m['aggregate_tok_s'] / base['aggregate_tok_s']:>6.2f} "
              f"{m['per_token_ms']:>9.1f} {m['per_token_ms'] / base['per_token_ms']:>6.2f} "
              f"{m['first_token_s']:>14.2f} {m['request_s']:>10.2f} {bare[n]:>13.1f} {m['client_cpu_ms']:>20.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

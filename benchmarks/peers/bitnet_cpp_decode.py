"""Prefill and decode speed of bitnet.cpp (its I2_S kernels) and bitnet on the same GGUF file, alternating.

    python -m benchmarks.peers.bitnet_cpp_decode --bench PATH [--threads 1] [--rounds 3] [--layers 30]

``PATH`` is ``bitnet_cpp_bench`` (``bitnet_cpp_bench.cpp`` built against bitnet.cpp: README.md
in this folder). The model is a random ternary model at BitNet b1.58 2B4T shapes (hidden
2560, intermediate 6912, heads 20/5, vocab 128256) with a SiLU MLP and sub-norms, GGUF
architecture ``bitnet``: the builds of bitnet.cpp that this folder's README can make know
``bitnet`` but not 2B4T's ``bitnet-b1.58`` (relu2), and the matmuls are the same. It is written
once with ``bn.save_gguf`` (I2_S projections, f16 tied embedding/head), and both engines load
that file; bitnet also runs it with its table as bf16 and as int8 (``--heads``).

Each round runs bitnet.cpp in a child process (a prefill of 64 tokens, then 32 single-token
steps), then bitnet the same way in this process with each head, so a machine whose speed
drifts slows them alike. Printed per engine: prefill tokens/s and decode tokens/s (of the
round's median step) as the median (min-max) over rounds, the fastest step, and bitnet over
bitnet.cpp of the medians. Not part of CI.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import bitnet as bn

from .llama_cpp_decode import placeholder_tokenizer, spread

PROMPT_TOKENS, DECODE_STEPS = 64, 32  # as bitnet_cpp_bench.cpp times them


def write_model(path: Path, layers: int) -> bn.BitNetConfig:
    """A random ``bitnet``-architecture model of 2B4T shapes and ``layers`` layers, written to ``path`` as I2_S."""
    config = bn.BitNetConfig(num_hidden_layers=layers, hidden_act="silu", bos_token_id=None, eos_token_id=None)
    model = bn.models.random_model(config, head_dtype="f16")
    bn.save_gguf(model, path, "i2_s", tokenizer=placeholder_tokenizer(config.vocab_size))
    return config


def prompt_ids() -> np.ndarray:
    """The prompt both engines read (the ids ``bitnet_cpp_bench.cpp`` uses)."""
    return 10 + (np.arange(PROMPT_TOKENS) * 7919) % 1000


def bitnet_cpp_round(bench: str, path: Path, threads: int) -> tuple[float, float, float]:
    """bitnet.cpp's prefill tokens/s, median and fastest decode step (seconds), from one run of ``bench``."""
    done = subprocess.run([bench, str(path), str(threads), "1"], capture_output=True, text=True, check=True)
    _, prefill, _, median, fastest = done.stdout.split()
    return float(prefill), float(median) / 1e3, float(fastest) / 1e3


def bitnet_round(model: bn.BitNetForCausalLM) -> tuple[float, float, float]:
    """bitnet's prefill tokens/s, median and fastest decode step (seconds), as ``bitnet_cpp_bench`` times them."""
    cache = model.new_cache(PROMPT_TOKENS + DECODE_STEPS)
    start = time.perf_counter()
    model.forward(prompt_ids(), cache, last_only=True)
    prefill = PROMPT_TOKENS / (time.perf_counter() - start)
    ids, logits, steps = np.array([11]), np.empty((1, model.config.vocab_size), np.float32), []
    for _ in range(DECODE_STEPS):
        start = time.perf_counter()
        model.forward(ids, cache, out=logits)
        steps.append(time.perf_counter() - start)
    return prefill, statistics.median(steps), min(steps)


def report(name: str, runs: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Print an engine's figures over the rounds; its median prefill and decode tokens/s."""
    prefill, decode = [r[0] for r in runs], [1 / r[1] for r in runs]
    print(f"{name}: prefill {spread(prefill)}, decode {spread(decode)}, fastest step "
          f"{min(r[2] for r in runs) * 1e3:.1f} ms")
    return float(np.median(prefill)), float(np.median(decode))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", required=True, help="the built bitnet_cpp_bench program")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (2B4T has 30)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1, help="threads of both engines")
    parser.add_argument("--heads", nargs="+", default=["bf16", "int8"], choices=["f16", "bf16", "int8"],
                        help="bitnet's table storage to run (bitnet.cpp keeps the file's f16)")
    args = parser.parse_args()
    if min(args.layers, args.rounds, args.threads) < 1:
        parser.error("--layers, --rounds and --threads must be at least 1")
    bn.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="peers_") as folder:
        path = Path(folder) / "bitnet-i2_s.gguf"
        config = write_model(path, args.layers)
        print(f"model: random bitnet (SiLU, sub-norms), {config.num_hidden_layers} layers of 2B4T shapes; "
              f"{path.stat().st_size / 2**20:.0f} MiB I2_S GGUF, f16 head; {args.threads} threads; prefill of "
              f"{PROMPT_TOKENS} tokens, then {DECODE_STEPS} decode steps per round")
        models = {head: bn.load_gguf(path, head_dtype=head) for head in args.heads}
        runs: dict[str, list] = {"bitnet.cpp": [], **{head: [] for head in args.heads}}
        for round_ in range(args.rounds + 1):  # round 0 warms up: pages the file in, compiles the kernels
            results = {"bitnet.cpp": bitnet_cpp_round(args.bench, path, args.threads)}
            results.update({head: bitnet_round(model) for head, model in models.items()})
            if round_:
                for name, result in results.items():
                    runs[name].append(result)
    prefill, decode = report("bitnet.cpp (f16 head)", runs.pop("bitnet.cpp"))
    for head, head_runs in runs.items():
        ours = report(f"bitnet {bn.__version__}, {head} head", head_runs)
        print(f"  bitnet / bitnet.cpp: prefill {ours[0] / prefill:.2f}, decode {ours[1] / decode:.2f} "
              f"(medians of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

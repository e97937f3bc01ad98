"""Decode speed of llama.cpp and bitnet on the same TQ2_0 GGUF file, alternating in one process.

    python -m benchmarks.peers.llama_cpp_decode [--layers 30] [--tokens 32] [--rounds 5] [--threads 2]

The model is a random Llama-architecture ternary model (SiLU, no sub-norms, GGUF
architecture ``llama``) at BitNet b1.58 2B4T shapes: hidden 2560, intermediate 6912, heads
20/5, vocab 128256, 30 layers (``--layers`` for quick runs). 2B4T itself is refused by
upstream llama.cpp (``unknown model architecture: 'bitnet-b1.58'``). It is written once with
``bn.save_gguf`` (TQ2_0 projections, f16 tied embedding/head, since GGUF has no int8 table),
then both engines load that file. Each round decodes ``--tokens`` greedy tokens from an
empty context with llama.cpp, then the same count with bitnet, so a machine whose speed
drifts slows both alike; a warm-up round of each comes first. Printed: tokens/s of each
engine as the median (min-max) over the rounds, and bitnet / llama.cpp of the medians.

Needs llama-cpp-python (see README.md in this folder); not part of CI.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import bitnet as bn

LLAMA_TERNARY = dict(model_type="llama", hidden_act="silu", sub_norms=False)


def llama_cpp_module():
    """``llama_cpp``, or SystemExit with how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("error: llama-cpp-python is not installed: see benchmarks/peers/README.md") from None
    return llama_cpp


def placeholder_tokenizer(size: int):
    """A byte-level BPE tokenizer of ``size`` ids: the 256 byte symbols, then unused ``<tN>`` tokens.

    llama.cpp refuses a GGUF file without ``tokenizer.ggml.*`` and wants one token per
    embedding row; the benchmark decodes ids, so what the tokens spell does not matter.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"<t{i}>": i for i in range(len(vocab), size)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def write_model(path: Path, layers: int) -> bn.BitNetConfig:
    """A random Llama ternary model of 2B4T shapes and ``layers`` layers, written to ``path`` as TQ2_0."""
    config = bn.BitNetConfig(num_hidden_layers=layers, bos_token_id=None, eos_token_id=None, **LLAMA_TERNARY)
    model = bn.models.random_model(config, head_dtype="f16")
    bn.save_gguf(model, path, "tq2_0", tokenizer=placeholder_tokenizer(config.vocab_size))
    return config


def llama_cpp_round(llama_cpp, llm, tokens: int) -> float:
    """Seconds for ``tokens`` greedy decode steps of llama.cpp from an empty context."""
    llm.reset()
    token = 1
    start = time.perf_counter()
    for _ in range(tokens):
        llm.eval([token])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
    return time.perf_counter() - start


def bitnet_round(model: bn.BitNetForCausalLM, tokens: int) -> float:
    """Seconds for ``tokens`` greedy decode steps of bitnet from an empty cache."""
    cache = model.new_cache(tokens)
    ids = np.array([1])
    logits = np.empty((1, model.config.vocab_size), np.float32)
    start = time.perf_counter()
    for _ in range(tokens):
        model.forward(ids, cache, out=logits)
        ids[0] = int(np.argmax(logits[0]))
    return time.perf_counter() - start


def spread(rates: list[float]) -> str:
    return f"{np.median(rates):.2f} ({min(rates):.2f}-{max(rates):.2f}) tok/s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (2B4T has 30)")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps per round and engine")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=2, help="threads of both engines")
    args = parser.parse_args()
    if min(args.layers, args.tokens, args.rounds, args.threads) < 1:
        parser.error("--layers, --tokens, --rounds and --threads must be at least 1")
    llama_cpp = llama_cpp_module()
    with tempfile.TemporaryDirectory(prefix="peers_") as folder:
        path = Path(folder) / "llama-ternary-tq2_0.gguf"
        config = write_model(path, args.layers)
        print(f"model: random Llama ternary, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
              f"intermediate {config.intermediate_size}, heads {config.num_attention_heads}/"
              f"{config.num_key_value_heads}, vocab {config.vocab_size}; {path.stat().st_size / 2**20:.0f} MiB "
              f"TQ2_0 GGUF, f16 head; {args.threads} threads; {args.tokens} tokens per round from an empty context")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=args.tokens + 8, n_batch=8, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
        bn.set_num_threads(args.threads)
        model = bn.load_gguf(path)
        llama_cpp_round(llama_cpp, llm, args.tokens)  # warm-up: page in the file, compile the kernels
        bitnet_round(model, args.tokens)
        theirs, ours = [], []
        for _ in range(args.rounds):
            theirs.append(args.tokens / llama_cpp_round(llama_cpp, llm, args.tokens))
            ours.append(args.tokens / bitnet_round(model, args.tokens))
        llm.close()
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}): {spread(theirs)}")
    print(f"bitnet {bn.__version__}: {spread(ours)}")
    print(f"bitnet / llama.cpp: {np.median(ours) / np.median(theirs):.2f} (medians of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

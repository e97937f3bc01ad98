"""Quality of the bundled model: held-out bits per byte of the ternary model, its float twin, xz and gzip.

    python benchmarks/bundled_model.py RUNS/ternary RUNS/float [--install]

Both runs come from ``python -m bitnet train`` with the same recipe (the second with
``--no-quantize``). The ternary model is scored with bitnet's own forward (numpy kernels),
the float one with torch; xz (``-9e``, through Python's lzma) and gzip (``-9``) compress the
concatenated held-out files. ``--install`` copies the ternary model into
``bitnet/models/bundled/`` with ``quality.json`` (the figures, and the small held-out sample
the tests recompute) and ``generation_config.json`` (its sampling defaults).
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import shutil
import time
from pathlib import Path

import numpy as np

import bitnet as bn
from bitnet.torch.corpus import bits_per_byte, numpy_window_nll, read_corpus, token_stream

SAMPLE_BYTES = 40_000  # the tests recompute bits per byte on the first held-out files up to this size
# Sampling defaults shipped with the model (generation_config.json, read by `python -m bitnet generate`):
# greedy decoding of a model this small falls into loops ("_child_child_child...").
GENERATION_CONFIG = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}


def sample(held_out: list[tuple[str, str]]) -> list[tuple[str, str]]:
    chosen, size = [], 0
    for name, text in held_out:
        if size >= SAMPLE_BYTES:
            break
        chosen.append((name, text))
        size += len(text.encode())
    return chosen


def numpy_bpb(model_dir: Path, texts: list[tuple[str, str]], context: int) -> float:
    model, tokenizer = bn.load_pretrained(model_dir), bn.load_tokenizer(model_dir)
    stream = token_stream(tokenizer, [t for _, t in texts])
    return bits_per_byte(numpy_window_nll(model), stream, sum(len(t.encode()) for _, t in texts), context)


def torch_bpb(model_dir: Path, texts: list[tuple[str, str]], context: int) -> float:
    from bitnet.torch import evaluate, from_pretrained, set_quantization

    model = from_pretrained(model_dir)
    set_quantization(model, 0.0)
    stream = token_stream(bn.load_tokenizer(model_dir), [t for _, t in texts])
    return evaluate(model, stream, sum(len(t.encode()) for _, t in texts), context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ternary_run", type=Path)
    parser.add_argument("float_run", type=Path)
    parser.add_argument("--install", action="store_true")
    args = parser.parse_args()
    recipe = json.loads((args.ternary_run / "result.json").read_text())
    float_recipe = json.loads((args.float_run / "result.json").read_text())
    context = recipe["config"]["context"]
    corpus = read_corpus(recipe["config"]["corpus"], recipe["config"]["pattern"])
    data = "".join(text for _, text in corpus.held_out).encode()
    start = time.perf_counter()
    figures = {
        "ternary_bpb": numpy_bpb(args.ternary_run / "model", corpus.held_out, context),
        "float_bpb": torch_bpb(args.float_run / "model", corpus.held_out, context),
        "xz_9e_bpb": 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data),
        "gzip_9_bpb": 8 * len(gzip.compress(data, 9)) / len(data),
    }
    held_out_sample = sample(corpus.held_out)
    figures["sample_files"] = [name for name, _ in held_out_sample]
    figures["sample_ternary_bpb"] = numpy_bpb(args.ternary_run / "model", held_out_sample, context)
    figures.update(held_out_files=len(corpus.held_out), held_out_bytes=len(data), context=context,
                   train_minutes=recipe["train_seconds"] / 60, float_train_minutes=float_recipe["train_seconds"] / 60,
                   tokens=recipe["tokens"])
    gap = figures["ternary_bpb"] / figures["float_bpb"] - 1
    seconds = time.perf_counter() - start
    print(f"held-out: {len(corpus.held_out)} files, {len(data):,} bytes (scored in {seconds:.0f} s)")
    for name in ("ternary_bpb", "float_bpb", "xz_9e_bpb", "gzip_9_bpb"):
        print(f"  {name:<12} {figures[name]:.4f} bits/byte")
    print(f"  ternary vs float: {100 * gap:+.1f}%; sample ({len(held_out_sample)} files): "
          f"{figures['sample_ternary_bpb']:.4f}")
    print(f"  training: {figures['tokens']:,} tokens, {figures['train_minutes']:.0f} min (ternary), "
          f"{figures['float_train_minutes']:.0f} min (float)")
    if args.install:
        target = bn.models.bundled.BUNDLED_DIR
        target.mkdir(exist_ok=True)
        for file in ("config.json", "model.safetensors", "tokenizer.json"):
            shutil.copyfile(args.ternary_run / "model" / file, target / file)
        (target / "quality.json").write_text(json.dumps(figures, indent=2) + "\n")
        (target / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        print(f"installed in {target}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

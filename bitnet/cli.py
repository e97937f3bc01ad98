"""``python -m bitnet``: command-line entry points.

Each subcommand is one function ``cmd_<name>(args)``; ``main`` only parses and dispatches.
A user mistake (a bad flag value, a missing model, a setting the model refuses) ends in one
``error: ...`` line on stderr and exit code 2, never a traceback: flags are checked by their
argparse types, everything else raises a :class:`bitnet.BitNetError` that ``main`` reports.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import numpy as np

import bitnet as bn
from bitnet import bench
from bitnet.kernels.cpu_features import supported_paths


def cmd_demo(args: argparse.Namespace) -> int:
    """Quantize a built-in random layer, pack it in every format, multiply, and report."""
    rng = np.random.default_rng(args.seed)
    m, k = args.out_features, args.in_features
    w = (rng.standard_normal((m, k)) * 0.02).astype(np.float32)
    x = rng.standard_normal(k).astype(np.float32)
    t = bn.quantize_weights(w)
    print(f"layer {m}x{k} float32 ({w.nbytes / 2**20:.2f} MiB), absmean scale {float(t.scale):.5f}")
    print(f"weight error vs float: sqnr {bn.metrics.sqnr(w, t):.2f} dB, cosine {bn.metrics.cosine(w, t):.4f}")

    exact = w @ x
    ternary_float = t.dequantize() @ x  # what the int8-activation matmul approximates
    numpy_s = bench.timings(lambda: w @ x)[0]
    print("err vs float: relative error of bn.matmul against float32 w @ x (mostly the weights' ternarization);")
    print("err vs ternary: against the dequantized ternary weights in float (the int8 activations' share)\n")
    print(f"{'format':<7}{'bytes':>11}{'bits/w':>8}{'round trip':>12}{'err vs float':>14}{'err vs ternary':>16}"
          f"{'matmul us':>11}{'vs numpy':>10}")
    for name in bn.FORMATS:
        p = bn.pack(t, name)
        same = np.array_equal(bn.unpack(p).codes, t.codes)
        y = bn.matmul(x, p)
        vs_float = np.linalg.norm(y - exact) / np.linalg.norm(exact)
        vs_ternary = np.linalg.norm(y - ternary_float) / np.linalg.norm(ternary_float)
        seconds = bench.timings(lambda p=p: bn.matmul(x, p))[0]
        print(f"{name:<7}{p.nbytes:>11,}{p.bits_per_weight:>8.3f}{'exact' if same else 'MISMATCH':>12}"
              f"{vs_float:>14.4f}{vs_ternary:>16.5f}{seconds * 1e6:>11.1f}{numpy_s / seconds:>9.1f}x")
    print(f"\nnumpy float32 w @ x: {numpy_s * 1e6:.1f} us ({w.nbytes:,} bytes of weights)")
    return 0


HEAD_CHOICES = ("auto", "f32", "f16", "bf16", "int8")


def _head_label(model) -> str:
    return f"{model.lm_head.dtype} head" + (" (tied to the embedding)" if model.tied else "")


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text from an HF BitNet model directory or a .gguf file (default: the bundled model), streaming it."""
    model = bn.load_pretrained(args.model_dir, head_dtype=args.head)
    tokenizer = bn.load_tokenizer(args.model_dir)
    source = args.model_dir or "the bundled model"
    if tokenizer is None:
        raise bn.CheckpointNotFoundError(f"{source} has no tokenizer.json to encode the prompt with")
    prompt = tokenizer.encode(args.prompt).ids
    if not prompt:
        raise bn.InvalidValueError(f"the prompt {args.prompt!r} encodes to no tokens with {source}'s tokenizer")
    kept, first_tokens, tail = _healed(tokenizer, prompt)
    budget = args.max_new_tokens + (len(prompt) - len(kept))  # the healed token is not a new one
    stamps = [time.perf_counter()]
    tokens = model.stream(kept, budget, *_sampling(args), args.seed, first_tokens=first_tokens)
    # The first token comes after every setting and the prompt's ids were checked: print nothing before.
    first = next(tokens)
    print(args.prompt, end="", flush=True)
    generated: list[int] = []
    shown = tail
    for token in itertools.chain([first], tokens):
        stamps.append(time.perf_counter())
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd") and len(text) > len(shown):  # wait for a multi-byte character's rest
            print(text[len(shown):], end="", flush=True)
            shown = text
    prefill = stamps[1] - stamps[0] if len(stamps) > 1 else float("nan")
    decode_steps = len(generated) - 1
    decode = stamps[-1] - stamps[1] if decode_steps > 0 else float("nan")
    print(f"\n\nprompt: {len(prompt)} tokens, {len(prompt) / prefill:.1f} tok/s | "
          f"decode: {decode_steps} tokens, {decode_steps / decode:.1f} tok/s | {_head_label(model)}")
    return 0


def _sampling(args: argparse.Namespace) -> tuple[float, int | None, float | None]:
    """``(temperature, top_k, top_p)``: the flags given, else the model's ``generation_config.json``, else greedy."""
    defaults = bn.io.read_generation_config(args.model_dir)
    sampled = bool(defaults.get("do_sample"))
    temperature = args.temperature if args.temperature is not None else (
        float(defaults.get("temperature", 1.0)) if sampled else 0.0)
    top_k = args.top_k if args.top_k is not None else (defaults.get("top_k") if sampled else None)
    top_p = args.top_p if args.top_p is not None else (defaults.get("top_p") if sampled else None)
    return temperature, top_k, top_p


def _healed(tokenizer, ids: list[int]) -> tuple[list[int], list[int] | None, str]:
    """Token healing: the prompt without its last token, the ids whose piece begins with that token's, and its text.

    A prompt that stops inside what the tokenizer would make one token (``"def "``: the space
    belongs to the next word's token) ends with a token the model rarely saw there; letting
    the model choose that last token again, among the ones that extend it, fixes it. Pieces
    are compared as the vocabulary stores them (``Ġ``/``▁`` for a space), not as decoded text.
    """
    tail = tokenizer.decode(ids[-1:]) if len(ids) > 1 else ""
    if not tail:  # nothing to heal, or a special token
        return ids, None, ""
    piece = tokenizer.id_to_token(ids[-1])
    allowed = [i for i in range(tokenizer.get_vocab_size()) if (tokenizer.id_to_token(i) or "").startswith(piece)]
    return ids[:-1], allowed, tail


def cmd_bench_model(args: argparse.Namespace) -> int:
    """Random-weight model of the BitNet b1.58 2B4T shapes: prefill/decode tokens/s and peak RSS."""
    from .models.bench import bench_model

    bn.set_num_threads(args.threads)
    config = bn.BitNetConfig(num_hidden_layers=args.layers)
    # Compile every kernel on a tiny model first: the compiler's memory is then not counted on
    # top of the big model's in the peak RSS.
    bench_model(bn.models.random_model(bn.BitNetConfig(
        vocab_size=256, hidden_size=320, intermediate_size=512, num_hidden_layers=1, num_attention_heads=20,
        num_key_value_heads=5), head_dtype=args.head), prompt_tokens=8, decode_tokens=2)
    start = time.perf_counter()
    model = bn.models.random_model(config, seed=args.seed, head_dtype=args.head)
    built = time.perf_counter() - start
    ternary = sum(linear.weight.nbytes for layer in model.layers for linear in
                  (*layer.attention.projections, layer.attention.o_proj, *layer.mlp.projections, layer.mlp.down_proj))
    print(f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, intermediate "
          f"{config.intermediate_size}, heads {config.num_attention_heads}/{config.num_key_value_heads}, vocab "
          f"{config.vocab_size}; ternary weights {ternary / 2**20:.0f} MiB, {_head_label(model)} "
          f"{model.lm_head.nbytes / 2**20:.0f} MiB; built in {built:.1f} s; {args.threads} threads")
    # On a shared machine other processes steal cycles: report the best of --repeats runs.
    runs = [bench_model(model, args.prompt_tokens, args.decode_tokens, args.seed) for _ in range(args.repeats)]
    r = max(runs, key=lambda run: run.decode_tokens_per_second)
    if args.repeats > 1:
        print("decode tok/s per run: " + ", ".join(f"{run.decode_tokens_per_second:.2f}" for run in runs))
    print(f"prefill: {r.prompt_tokens} tokens, {r.prefill_tokens_per_second:.1f} tok/s")
    print(f"decode:  {r.decode_tokens} tokens, {r.decode_tokens_per_second:.2f} tok/s "
          f"({1e3 * r.decode_seconds_per_token:.1f} ms/token median; matmul kernels "
          f"{1e3 * r.kernel_seconds_per_step:.1f} ms, outside them {100 * r.overhead_share:.1f}%; "
          f"Python overhead {1e3 * r.python_seconds_per_step:.2f} ms = {100 * r.python_share:.1f}%)")
    print(f"peak RSS: {r.peak_rss_bytes / 2**30:.2f} GiB")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Time bn.matmul (activation quantization included) against numpy float32 on the same shapes."""
    shapes = bench.SHAPES if args.quick else (*bench.SHAPES, bench.STREAM_SHAPE)
    paths = args.paths or bench.default_paths()
    print(f"matmul: i2 weights, float32 activations; {args.threads or bn.get_num_threads()} threads; "
          f"default path {bn.ops.KERNEL_PATH}; us: median wall time, best: fastest run; "
          f"numpy float32 x @ w.T timed in the same run")
    print(bench.format_table(bench.run(shapes, paths, args.threads, min_time=args.min_time)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a BitNet b1.58 model with quantization-aware training on a text corpus (needs the [train] extra)."""
    try:
        from .torch.config import TrainConfig
        from .torch.training import train
    except ImportError as exc:
        print(f'error: training needs PyTorch and transformers ({exc}); pip install "bitnet[train]"', file=sys.stderr)
        return 2
    values = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__}
    result = train(TrainConfig(**values), resume=args.resume, overwrite=args.overwrite,
                   progress=not args.no_progress, threads=args.threads)
    if result.model_dir is not None:
        print(f"held-out bits per byte: {result.held_out_bpb:.4f}; {result.tokens:,} tokens in "
              f"{result.seconds / 60:.1f} min; model in {result.model_dir}")
    return 0


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, with its default (the bundled model's recipe)."""
    import dataclasses

    from .torch.config import TrainConfig

    defaults = TrainConfig(out_dir="")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if field.name == "out_dir":
            parser.add_argument(flag, required=True, help="where the checkpoint, log and exported model go")
        elif isinstance(default, bool) or default is None:
            note = " (None: bf16 where the CPU has it)" if default is None else ""
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"default: %(default)s{note}")
        else:
            parser.add_argument(flag, type=type(default), default=default, help="default: %(default)s")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty OUT_DIR")
    parser.add_argument("--threads", type=_at_least(1), default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one ``error: ...`` line (with where to find the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


def _kernel_paths(text: str) -> list[str]:
    paths = text.split(",")
    supported = supported_paths()
    for path in paths:
        if path not in supported:
            raise argparse.ArgumentTypeError(f"{path!r} is not a kernel path this CPU runs; choose from "
                                             f"{', '.join(supported)}")
    return paths


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bitnet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--out-features", type=_at_least(1), default=2560)
    demo.add_argument("--in-features", type=_at_least(1), default=2560)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)
    generate = sub.add_parser("generate", help=cmd_generate.__doc__)
    generate.add_argument("model_dir", nargs="?", default=None,
                          help="HF model directory or .gguf file (default: the model bundled in the package)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    generate.add_argument("--temperature", type=float, default=None,
                          help="0 for greedy (default: the model's generation_config.json, else 0)")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=_at_least(0), default=None)
    generate.add_argument("--head", choices=HEAD_CHOICES, default="auto", help="embedding/head storage")
    generate.set_defaults(run=cmd_generate)
    matmul_bench = sub.add_parser("bench", help=cmd_bench.__doc__)
    matmul_bench.add_argument("--threads", type=_at_least(1), default=None, help="default: numba's setting")
    matmul_bench.add_argument("--paths", type=_kernel_paths,
                              help="kernel paths, comma-separated (default: the selected one and portable)")
    matmul_bench.add_argument("--quick", action="store_true", help="skip the 519 MB DRAM-streaming shape")
    matmul_bench.add_argument("--min-time", type=_positive_float, default=0.3, help="seconds spent timing each row")
    matmul_bench.set_defaults(run=cmd_bench)
    bench = sub.add_parser("bench-model", help=cmd_bench_model.__doc__)
    bench.add_argument("--layers", type=_at_least(1), default=30)
    bench.add_argument("--head", choices=HEAD_CHOICES[1:], default="bf16", help="embedding/head storage")
    bench.add_argument("--prompt-tokens", type=_at_least(1), default=64)
    bench.add_argument("--decode-tokens", type=_at_least(1), default=32)
    bench.add_argument("--threads", type=_at_least(1), default=2)
    bench.add_argument("--repeats", type=_at_least(1), default=1, help="report the best of this many runs")
    bench.add_argument("--seed", type=_at_least(0), default=0)
    bench.set_defaults(run=cmd_bench_model)
    train = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    _add_train_arguments(train)
    train.set_defaults(run=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a flag refused in one line by _Parser.error
        return exc.code
    try:
        return args.run(args)
    except bn.BitNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as Unix tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (Python flushes stdout once more at exit)
        return 0

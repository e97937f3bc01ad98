"""Command line of bitnet: python -m bitnet COMMAND (demo, generate, convert, info, bench, bench-model, serve, train).

Each subcommand is one function ``cmd_<name>(args)``; ``main`` only parses and dispatches.
A user mistake (a bad flag value, a missing model, a setting the model refuses) ends in one
``error: ...`` line on stderr and exit code 2, never a traceback: flags are checked by their
argparse types, everything else raises a :class:`bitnet.BitNetError` that ``main`` reports.
Timings exclude JIT compilation (the kernels run once before the clock starts) and come with
the machine's load average when other processes share its CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NoReturn

import numpy as np

import bitnet as bn
from bitnet.choices import (
    CACHE_DTYPES,
    CONVERT_FORMATS,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PREFILL_CHUNK,
    HEAD_DTYPES,
    HEADS,
)


def cmd_demo(args: argparse.Namespace) -> int:
    """Quantize a built-in random layer, pack it in every format, multiply, and report."""
    from bitnet import bench

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


def _head_label(model) -> str:
    return f"{model.lm_head.dtype} head" + (" (tied to the embedding)" if model.tied else "")


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text from an HF BitNet model directory or a .gguf file (default: the bundled model), streaming it."""
    model = bn.load_pretrained(args.model_dir, head_dtype=args.head)
    tokenizer = bn.load_tokenizer(args.model_dir)
    source = args.model_dir or "the bundled model"
    if tokenizer is None:
        raise bn.CheckpointNotFoundError(f"{source} has no tokenizer.json to encode the prompt with")
    if args.chat:
        return _chat(args, model, tokenizer, source)
    prompt = tokenizer.encode(args.prompt).ids
    if not prompt:
        raise bn.InvalidValueError(f"the prompt {args.prompt!r} encodes to no tokens with {source}'s tokenizer")
    kept, first_tokens, tail = _healed(tokenizer, prompt)
    budget = args.max_new_tokens + (len(prompt) - len(kept))  # the healed token is not a new one
    tokens = model.stream(kept, budget, *_sampling(args), args.seed, first_tokens=first_tokens)
    warm_up = _warm_up(model, len(kept))
    stamps = [time.perf_counter()]
    # The first token comes after every setting and the prompt's ids were checked: print nothing before.
    first = next(tokens)
    stamps.append(time.perf_counter())
    print(args.prompt, end="", flush=True)
    for piece in _decoded(tokenizer, _timed(itertools.chain([first], tokens), stamps, skip=1), tail):
        print(piece, end="", flush=True)
    prefill = stamps[1] - stamps[0]
    steps = np.diff(stamps[1:])
    decode = f"decode: {len(steps)} tokens"
    if len(steps):
        decode += (f", {len(steps) / steps.sum():.1f} tok/s (per token: min {1e3 * steps.min():.1f} / median "
                   f"{1e3 * np.median(steps):.1f} ms)")
    print(f"\n\nprompt: {len(prompt)} tokens, {len(prompt) / prefill:.1f} tok/s | {decode} | {_head_label(model)} | "
          f"kernel warm-up {warm_up:.2f} s, not counted")
    _print_load_note()
    return 0


def _timed(tokens: Iterable[int], stamps: list[float], skip: int = 0) -> Iterator[int]:
    """``tokens``, appending the time each one arrived to ``stamps`` (after the first ``skip``, stamped already)."""
    for i, token in enumerate(tokens):
        if i >= skip:
            stamps.append(time.perf_counter())
        yield token


def _decoded(tokenizer, tokens: Iterable[int], shown: str = "") -> Iterator[str]:
    """The text of ``tokens`` piece by piece, as it grows, less the ``shown`` start already printed."""
    from bitnet.io.detokenize import TextStream

    text = TextStream(tokenizer, skip=shown)
    for token in tokens:
        piece = text.push(token)
        if piece:
            yield piece


WARM_UP_LENGTHS = (1, 8, 32)  # one token (decode), the 8-token tiles, AMX's 32-token batches


def _warm_up(model, prompt_length: int) -> float:
    """Run every kernel the timed generation will call once, on dummy tokens; returns the seconds spent.

    Numba compiles (or loads from its cache) a kernel on its first call, so the first forward
    pass is slower by the compile time. A prefill of each batch size class the prompt reaches
    (decode GEMV, 8-token tiles, 32-token AMX batches) and one cached decode step run them all.
    """
    start = time.perf_counter()
    for length in sorted({min(n, prompt_length) for n in WARM_UP_LENGTHS}):
        cache = model.new_cache(length + 1)
        model.forward(np.zeros(length, np.int64), cache, last_only=True)
        model.forward(np.zeros(1, np.int64), cache)
    return time.perf_counter() - start


def _load_note() -> str | None:
    """A warning when other processes keep the CPUs busy (load average above half the CPU count), else None."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load <= 0.5 * cpus:
        return None
    return (f"note: load average {load:.1f} on {cpus} CPUs: other processes share them, so these timings are slower "
            f"and more spread out than on an idle machine")


def _print_load_note() -> None:
    note = _load_note()
    if note:
        print(note)


def _chat(args: argparse.Namespace, model, tokenizer, source: str) -> int:
    """An interactive conversation: each line read is a user turn, each reply streamed.

    The whole conversation is encoded again for every reply (the model's chat template, or a
    plain "User: ... / Assistant: ..." transcript), dropping its oldest turns when it does not
    fit the model's context with room for the reply. Ctrl-C stops a reply; at the prompt, a
    second Ctrl-C in a row, or end of input (Ctrl-D), ends the program.
    """
    from bitnet.io.chat import ASSISTANT, USER, chat_format, fitted

    try:
        import readline  # noqa: F401  (gives input() line editing and history)
    except ImportError:  # not on every platform; input() still works without it
        pass
    context = model.config.max_position_embeddings
    if args.max_new_tokens >= context:
        raise bn.InvalidValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the conversation in "
                                   f"the model's context of {context} tokens")
    chat = chat_format(args.model_dir, tokenizer, model.config)
    if chat.note:
        print(f"note: {chat.note}", file=sys.stderr)
    sampling = _sampling(args)
    _warm_up(model, context - args.max_new_tokens)
    kind = "its chat template" if chat.templated else "a plain User:/Assistant: transcript (it has no chat template)"
    print(f"chatting with {source} through {kind}; Ctrl-C stops a reply, Ctrl-D (or Ctrl-C twice) quits",
          file=sys.stderr)
    messages: list[dict[str, str]] = []
    interrupted = False
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            if interrupted:
                print()
                return 0
            interrupted = True
            print("\n(Ctrl-C again or Ctrl-D to quit)", file=sys.stderr)
            continue
        interrupted = False
        if not line.strip():
            continue
        messages.append({"role": USER, "content": line})
        ids = fitted(messages, chat.render, context - args.max_new_tokens)
        reply = _stream_reply(tokenizer, model.stream(ids, args.max_new_tokens, *sampling, args.seed), chat.stop)
        messages.append({"role": ASSISTANT, "content": reply.strip()})


def _stream_reply(tokenizer, tokens: Iterable[int], stop: str | None) -> str:
    """Print the reply as it comes and return it, cut before ``stop`` (the next turn's start).

    Ctrl-C ends it early: the part already printed is the reply the conversation keeps.
    """
    from bitnet.io.detokenize import TextStream

    # The transcript's space after "Assistant:" is not the reply's.
    text = TextStream(tokenizer, [stop] if stop else [], strip_start=True)
    try:
        for token in tokens:
            print(text.push(token), end="", flush=True)
            if text.stopped:
                break
    except KeyboardInterrupt:
        print(" [stopped]", flush=True)
        return text.shown
    print(text.flush(), flush=True)
    return text.shown


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
    """Random-weight model of the BitNet b1.58 2B4T shapes: prefill/decode tokens/s against the DRAM bound, peak RSS."""
    from .models.bench import bench_model, decode_by_context, decode_step_bytes

    def stage(name: str) -> None:
        print(f"bench-model: {name}...", file=sys.stderr, flush=True)

    bn.set_num_threads(args.threads)
    contexts = sorted(set(args.context))
    # 2B4T's context is 4096 positions; a longer one asked for here is only a longer rope table.
    config = bn.BitNetConfig(num_hidden_layers=args.layers, max_position_embeddings=max(
        4096, args.prompt_tokens, contexts[-1] + args.decode_tokens))
    # Compile every kernel on a tiny model first: the compiler's memory is then not counted on
    # top of the big model's in the peak RSS.
    stage("compiling the kernels on a tiny model")
    bench_model(bn.models.random_model(bn.BitNetConfig(
        vocab_size=256, hidden_size=320, intermediate_size=512, num_hidden_layers=1, num_attention_heads=20,
        num_key_value_heads=5), head_dtype=args.head), prompt_tokens=8, decode_tokens=2, context=4, repeats=1,
        read_bytes=2**20)
    stage(f"building the {args.layers}-layer model with random weights")
    start = time.perf_counter()
    model = bn.models.random_model(config, seed=args.seed, head_dtype=args.head)
    model.kv_dtype = args.kv_dtype
    built = time.perf_counter() - start
    print(f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, intermediate "
          f"{config.intermediate_size}, heads {config.num_attention_heads}/{config.num_key_value_heads}, vocab "
          f"{config.vocab_size}; ternary weights {decode_step_bytes(model, 0).ternary / 2**20:.0f} MiB, "
          f"{_head_label(model)} {model.lm_head.nbytes / 2**20:.0f} MiB, {args.kv_dtype} KV cache; built in "
          f"{built:.1f} s; {args.threads} threads")
    r = bench_model(model, args.prompt_tokens, args.decode_tokens, args.seed, contexts[0], args.repeats,
                    progress=stage)
    by_context = decode_by_context(model, contexts, args.decode_tokens, args.repeats, args.seed,
                                   stage) if len(contexts) > 1 else {}

    def spread(s, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
        return f"{s.median * scale:.{digits}f}{unit} ({s.low * scale:.{digits}f}-{s.high * scale:.{digits}f}{unit})"

    runs = f"median (min-max) of {args.repeats} run{'s' if args.repeats > 1 else ''}"
    print(f"prefill: {r.prompt_tokens} tokens, {spread(r.prefill_tokens_per_second)} tok/s, {runs}")
    print(f"decode:  {r.decode_tokens} tokens after {r.context} cached positions, "
          f"{spread(r.decode_tokens_per_second, digits=2)} tok/s (per token: min "
          f"{1e3 * r.decode_best_seconds_per_token:.1f} / median {1e3 * r.decode_seconds_per_token:.1f} ms; matmul "
          f"kernels {1e3 * r.kernel_seconds_per_step:.1f} ms, outside them {100 * r.overhead_share:.1f}%; "
          f"Python overhead {1e3 * r.python_seconds_per_step:.2f} ms = {100 * r.python_share:.1f}%)")
    b = r.step_bytes
    print(f"DRAM read: {spread(r.read_bandwidth, 1e-9)} GB/s ({args.threads} threads, same process, after each "
          f"decode step); a decode step reads {b.total / 1e6:.0f} MB (ternary {b.ternary / 1e6:.0f} + head "
          f"{b.head / 1e6:.0f} + KV cache {b.kv_cache / 1e6:.1f}): bound {spread(r.bound_tokens_per_second)} "
          f"tok/s, reached {spread(r.bound_fraction, 100, 0, '%')}")
    if by_context:
        first, first_bytes = by_context[contexts[0]].median, decode_step_bytes(model, contexts[0]).total
        shares = [f"{c}: {spread(s, digits=2)} tok/s = {100 * s.median / first:.0f}% "
                  f"(bytes {100 * first_bytes / decode_step_bytes(model, c).total:.0f}%)"
                  for c, s in by_context.items()]
        print(f"decode by context ({args.decode_tokens} steps after each, {runs}, steps taken in turns; in brackets "
              f"the share its bytes allow at the first context's share of the bound): " + "; ".join(shares))
    print(f"peak RSS: {r.peak_rss_bytes / 2**30:.2f} GiB; kernels compiled and warmed up before timing")
    _print_load_note()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Time bn.matmul (activation quantization included) against numpy float32 on the same shapes."""
    from bitnet import bench

    if args.plot:
        bench.check_plot_path(args.plot)  # before minutes of timing, not after
    shapes = bench.SHAPES if args.quick else (*bench.SHAPES, bench.STREAM_SHAPE)
    paths = args.paths or bench.default_paths()
    threads = args.threads or bn.get_num_threads()
    print(f"matmul: i2 weights, float32 activations; {threads} threads; "
          f"default path {bn.ops.KERNEL_PATH}; us: median wall time, best: fastest run (after one untimed "
          f"run that compiles the kernel); numpy float32 x @ w.T timed in the same run")
    rows = bench.run(shapes, paths, args.threads, min_time=args.min_time)
    print(bench.format_table(rows))
    _print_load_note()
    if args.plot:
        bench.plot(rows, args.plot, f"bn.matmul, {threads} threads, {os.cpu_count()} CPUs")
        print(f"plot: {args.plot}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a model between an HF directory (packed or float) and a GGUF file, its tokenizer included."""
    bar = _ProgressBar()
    try:
        result = bn.io.convert_checkpoint(args.source, args.destination, args.format, args.head, args.overwrite,
                                          progress=bar)
    finally:
        bar.close()
    tokenizer = "with its tokenizer" if result.tokenizer else "no tokenizer (the source has none)"
    print(f"{result.destination}: {result.format}, {result.tensors} tensors, {_size(result.nbytes)}, {tokenizer}; "
          f"{result.seconds:.1f} s")
    return 0


class _ProgressBar:
    """A tqdm bar on stderr over each stage of a conversion (the weights read, then the write).

    Called as ``bar(stage, done, total)``. The bar appears with the first report (so a refusal
    before any work is the only line on stderr) and only on a terminal; without tqdm there is
    no bar.
    """

    def __init__(self) -> None:
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional: no bar, the conversion is the same
                return
            self.stage = stage
            unit = "weight" if stage == "read" else "step"
            self.bar = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, leave=False, disable=None)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a model directory or .gguf file from its headers: architecture, tensors, scales, tokenizer, size."""
    info = bn.io.describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(_info_text(info))
    return 0


def _info_text(info: dict) -> str:
    a, p, t = info["architecture"], info["projections"], info["tokenizer"]
    kind = "GGUF file" if info["kind"] == "gguf" else "HF model directory"
    family = f"{a['hidden_act']} MLP, {'with' if a['sub_norms'] else 'no'} sub-norms, " \
             f"{'tied' if a['tied_embeddings'] else 'untied'} head"
    gguf_name = a["gguf_architecture"] or "none"
    scales = "-" if p["scale_min"] is None else f"{p['scale_min']:.6g} .. {p['scale_max']:.6g}"
    bits = "-" if p["bits_per_weight"] is None else f"{p['bits_per_weight']:.4g}"
    lines = [
        f"{info['path']}: {kind}, {_size(info['file_size'])}",
        f"family: model_type {a['model_type']} ({a['hf_architecture']}), GGUF architecture {gguf_name}; {family}",
        f"shape: {a['layers']} layers, hidden {a['hidden_size']}, intermediate {a['intermediate_size']}, heads "
        f"{a['attention_heads']}/{a['kv_heads']} (head_dim {a['head_dim']}), vocab {a['vocab_size']}, context "
        f"{a['context']}, rope {a['rope_type']} (theta {a['rope_theta']:g})",
        f"parameters: {info['parameters']:,} ({p['weights']:,} in projections); "
        f"{info['bits_per_parameter']:.3g} bits/parameter on disk",
        f"projections: {_counts(p['formats'])}; {bits} bits/weight; scales {scales}",
        "tensors: " + f"{info['tensors']['count']}: " + "; ".join(
            f"{role} {_counts(formats)}" for role, formats in info["tensors"]["formats"].items()),
    ]
    if t["present"]:
        template = "a chat template" if t["chat_template"] else "no chat template"
        lines.append(f"tokenizer: {t['kind']}, {t['vocab_size']:,} tokens, {template}")
    else:
        lines.append("tokenizer: none")
    return "\n".join(lines)


def _counts(formats: dict[str, int]) -> str:
    return ", ".join(f"{count} x {name}" for name, count in formats.items()) or "none"


@contextlib.contextmanager
def _extra(extra: str, needs: str) -> Iterator[None]:
    """Turn an ImportError inside the block into the DependencyError that names the extra to install."""
    try:
        yield
    except ImportError as exc:
        raise bn.errors.DependencyError(f'{needs} ({exc}); pip install "bitnet-numba[{extra}]"') from None


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching (needs the [serve] extra)."""
    with _extra("serve", "serving needs uvicorn and starlette"):
        from .serve.server import serve
    serve(args.model_dir, host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
          max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
          prefill_chunk=args.prefill_chunk, threads=args.threads, head_dtype=args.head)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a BitNet b1.58 model with quantization-aware training on a text corpus (needs the [train] extra)."""
    with _extra("train", "training needs PyTorch and transformers"):
        from .torch.config import TrainConfig
        from .torch.training import train
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless the text says it already or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in help:
            return help
        return super()._get_help_string(action)


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
    from bitnet.kernels.cpu_features import supported_paths

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


class _VersionAction(argparse.Action):
    """``--version``: looks the version up when asked (reading the installed distributions' metadata
    took ~0.17 s, half of every command's start)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show the version and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        print(f"{parser.prog} {_version()}")  # on stdout, as argparse's own version action
        parser.exit()


def _version() -> str:
    """The installed distribution's version (whatever the distribution is named), else the package's own."""
    from importlib import metadata

    for distribution in metadata.packages_distributions().get(__package__, []):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return bn.__version__


def _doc(command: Callable) -> str:
    """A command's docstring summary as plain help text (no reST markup)."""
    return command.__doc__.split("\n")[0].replace("``", "")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bitnet", description=_doc(sys.modules[__name__]),
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=_doc(run), description=_doc(run), formatter_class=_HelpFormatter)
        parser.set_defaults(run=run)
        return parser

    demo = command("demo", cmd_demo)
    demo.add_argument("--out-features", type=_at_least(1), default=2560, help="rows of the random layer")
    demo.add_argument("--in-features", type=_at_least(1), default=2560, help="columns of the random layer")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random layer")
    generate = command("generate", cmd_generate)
    generate.add_argument("model_dir", nargs="?", default=None,
                          help="HF model directory or .gguf file (default: the model bundled in the package)")
    text = generate.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="the text to continue")
    text.add_argument("--chat", action="store_true",
                      help="talk with the model: each line typed is a turn, the reply streams; Ctrl-C stops a reply, "
                           "Ctrl-D (or Ctrl-C twice at the prompt) quits")
    generate.add_argument("--max-new-tokens", type=_at_least(1), default=64, help="tokens to generate at most (per "
                          "reply with --chat)")
    generate.add_argument("--temperature", type=float, default=None,
                          help="0 for greedy (default: the model's generation_config.json, else 0)")
    generate.add_argument("--top-k", type=int, default=None,
                          help="sample among the k likeliest tokens (default: generation_config.json, else all)")
    generate.add_argument("--top-p", type=float, default=None,
                          help="nucleus sampling threshold (default: generation_config.json, else 1)")
    generate.add_argument("--seed", type=_at_least(0), default=None, help="sampling seed (default: random)")
    generate.add_argument("--head", choices=HEADS, default="auto",
                          help="embedding/head storage (auto: as in the checkpoint)")
    convert = command("convert", cmd_convert)
    convert.add_argument("source", help="HF model directory (packed, or float: quantized with absmean) or .gguf file")
    convert.add_argument("destination", help="HF directory (--format hf) or .gguf file to write")
    convert.add_argument("--format", required=True, choices=CONVERT_FORMATS,
                         help="hf: HF packed directory (2 bits/weight); tq2_0 (2.06), tq1_0 (1.69): llama.cpp GGUF; "
                              "i2_s (2 + a float32 scale): bitnet.cpp GGUF")
    convert.add_argument("--head", choices=HEADS, default="auto",
                         help="embedding/head storage (auto: as in the source; int8 values are stored as float32)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    info = command("info", cmd_info)
    info.add_argument("path", help="HF model directory or .gguf file")
    info.add_argument("--json", action="store_true", help="print everything as JSON, per-tensor list included")
    matmul_bench = command("bench", cmd_bench)
    matmul_bench.add_argument("--threads", type=_at_least(1), default=None, help="default: numba's setting")
    matmul_bench.add_argument("--paths", type=_kernel_paths,
                              help="kernel paths, comma-separated (default: the selected one and portable)")
    matmul_bench.add_argument("--quick", action="store_true", help="skip the 519 MB DRAM-streaming shape")
    matmul_bench.add_argument("--min-time", type=_positive_float, default=0.3, help="seconds spent timing each row")
    matmul_bench.add_argument("--plot", metavar="FILE.png",
                              help="also draw the table as a bar chart into this image file (needs matplotlib)")
    bench_model = command("bench-model", cmd_bench_model)
    bench_model.add_argument("--layers", type=_at_least(1), default=30, help="decoder layers (2B4T has 30)")
    bench_model.add_argument("--head", choices=HEAD_DTYPES, default="int8",
                             help="embedding/head storage; the README's figures are for the int8 head")
    bench_model.add_argument("--prompt-tokens", type=_at_least(1), default=64, help="tokens of the timed prefill")
    bench_model.add_argument("--decode-tokens", type=_at_least(1), default=32, help="timed decode steps")
    bench_model.add_argument("--threads", type=_at_least(1), default=2, help="numba threads")
    bench_model.add_argument("--repeats", type=_at_least(1), default=3,
                             help="runs of prefill, decode and bandwidth; each figure is their median (min-max)")
    bench_model.add_argument("--context", type=_at_least(0), nargs="+", default=[0],
                             help="cached positions (random tokens, filled untimed) before the timed decode steps; "
                                  "several (e.g. 0 512 2048 4096) add decode tok/s at each, measured side by side")
    bench_model.add_argument("--kv-dtype", choices=CACHE_DTYPES, default="float16",
                             help="KV cache storage (float16 as llama.cpp; float32 gives transformers' numbers)")
    bench_model.add_argument("--seed", type=_at_least(0), default=0, help="seed of the random weights and prompt")
    serve = command("serve", cmd_serve)
    serve.add_argument("model_dir", nargs="?", default=None,
                       help="HF model directory or .gguf file (default: the model bundled in the package)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=_at_least(0), default=8000, help="TCP port (0: any free one)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every request (default: $BITNET_API_KEY, "
                            "else no key)")
    serve.add_argument("--model-name", default=None,
                       help="the model name clients give (default: the directory's name, bitnet-bundled)")
    serve.add_argument("--max-batch", type=_at_least(1), default=DEFAULT_MAX_BATCH, help="requests generating at once")
    serve.add_argument("--max-queue", type=_at_least(1), default=DEFAULT_MAX_QUEUE,
                       help="requests waiting for a slot; past it requests get 503")
    serve.add_argument("--max-context", type=_at_least(1), default=None,
                       help="most prompt + max_tokens positions per request (default: the model's context)")
    serve.add_argument("--prefill-chunk", type=_at_least(1), default=DEFAULT_PREFILL_CHUNK,
                       help="most prompt tokens read in one step, over all requests")
    serve.add_argument("--threads", type=_at_least(1), default=None, help="numba threads (default: numba's setting)")
    serve.add_argument("--head", choices=HEADS, default="auto",
                       help="embedding/head storage (auto: as in the checkpoint)")
    train = command("train", cmd_train)
    _add_train_arguments(train)
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
    except KeyboardInterrupt:  # Ctrl-C outside a chat reply: stop without a traceback (saves are atomic)
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as Unix tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (Python flushes stdout once more at exit)
        return 0

"""``python -m bitnet``: command-line entry points.

Each subcommand is one function ``cmd_<name>(args)``; ``main`` only parses and dispatches.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bitnet as bn


def _median_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


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
    numpy_s = _median_seconds(lambda: w @ x)
    print(f"\n{'format':<7}{'bytes':>11}{'bits/w':>8}{'round trip':>12}{'rel err':>9}{'matmul us':>11}{'vs numpy':>10}")
    for name in bn.FORMATS:
        p = bn.pack(t, name)
        same = np.array_equal(bn.unpack(p).codes, t.codes)
        y = bn.matmul(x, p)
        rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
        seconds = _median_seconds(lambda p=p: bn.matmul(x, p))
        print(f"{name:<7}{p.nbytes:>11,}{p.bits_per_weight:>8.3f}{'exact' if same else 'MISMATCH':>12}"
              f"{rel:>9.4f}{seconds * 1e6:>11.1f}{numpy_s / seconds:>9.1f}x")
    print(f"\nnumpy float32 w @ x: {numpy_s * 1e6:.1f} us ({w.nbytes:,} bytes of weights)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bitnet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--out-features", type=int, default=2560)
    demo.add_argument("--in-features", type=int, default=2560)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)

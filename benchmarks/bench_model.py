"""Decode and prefill speed of BitNet b1.58 2B4T-shaped random models, one line per setting.

    .venv/bin/python benchmarks/bench_model.py [--layers 30] [--threads 2]

Runs ``bitnet.models.bench.bench_model`` (what ``python -m bitnet bench-model`` prints) for
an int8 and a bf16 head, each in a fresh process so that peak RSS belongs to one model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    for head in ("int8", "bf16"):
        command = [sys.executable, "-m", "bitnet", "bench-model", "--head", head, "--layers", str(args.layers),
                   "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens)]
        print(f"$ {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Matmul benchmark behind ``python -m bitnet bench`` (and shared with the asv suite).

Every row is timed as the median of many runs, next to numpy float32 ``x @ w.T`` measured
in the same run on the same shape, because the machine may be busy: ratios measured
together stay meaningful when absolute numbers drift.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import errors, ops
from .formats import PackedTernary
from .kernels import cpu_features

# (m, k, n): decode GEMVs of a 2B-class model, a batch of 8 sequences, a long prefill, and
# 2B4T's fused gate/up projection in a 64-token prefill chunk.
SHAPES = ((2560, 2560, 1), (6912, 2560, 1), (2560, 6912, 1), (2560, 2560, 8), (2560, 6912, 128), (13824, 2560, 64))
# 519 MB of i2 weights: far more than any cache, so the kernel streams them from DRAM.
STREAM_SHAPE = (16384, 126720, 1)


@dataclass
class Row:
    m: int
    k: int
    n: int
    threads: int
    path: str
    seconds: float  # median
    best_seconds: float
    numpy_seconds: float | None  # median

    @property
    def gweights_per_s(self) -> float:
        """Weight x token products per second at the median, in billions (weights/s for n = 1)."""
        return self.m * self.k * self.n / self.seconds / 1e9

    @property
    def speedup(self) -> float | None:
        """numpy float32's median time over ours (both medians)."""
        return None if self.numpy_seconds is None else self.numpy_seconds / self.seconds


def timings(fn, min_time: float = 0.3, min_repeats: int = 7, max_repeats: int = 5000) -> tuple[float, float]:
    """Median and best wall time of ``fn()`` over at least ``min_repeats`` runs and ``min_time`` seconds."""
    fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_repeats and (len(times) < min_repeats or spent < min_time):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return float(np.median(times)), float(np.min(times))


def random_i2_weights(m: int, k: int, seed: int = 0) -> PackedTernary:
    """Random ternary weights built directly in the i2 layout (fast even at hundreds of MB)."""
    rng = np.random.default_rng(seed)
    # Every byte value whose four 2-bit fields are 0, 1 or 2 (a stored code is w + 1).
    valid = np.array([v for v in range(256) if all((v >> s) & 3 != 3 for s in (0, 2, 4, 6))], np.uint8)
    nbytes = -(-k // 256) * 64
    data = valid[rng.integers(0, valid.size, (m, nbytes), dtype=np.uint8)]
    tail = k % 256
    if tail:  # past k the last block must hold zero weights, stored as 1 in every field
        stored = rng.integers(0, 3, (m, 256), dtype=np.uint8)
        stored[:, tail:] = 1
        data[:, -64:] = sum(stored[:, 64 * i : 64 * (i + 1)] << (2 * i) for i in range(4))
    return PackedTernary("i2", (m, k), data, np.float32(0.02).reshape(()))


def run(shapes=SHAPES, paths=None, threads: int | None = None, with_numpy: bool = True,
        min_time: float = 0.3) -> list[Row]:
    """Time ``bn.matmul`` (activation quantization included) on each shape and path."""
    paths = paths or [ops.KERNEL_PATH]
    before = ops.get_num_threads()
    if threads is not None:
        ops.set_num_threads(threads)
    rows = []
    try:
        for m, k, n in shapes:
            rows += _time_shape(m, k, n, paths, with_numpy, min_time)
    finally:
        ops.set_num_threads(before)
    return rows


def _time_shape(m: int, k: int, n: int, paths, with_numpy: bool, min_time: float) -> list[Row]:
    w = random_i2_weights(m, k)
    x = np.random.default_rng(1).standard_normal((n, k) if n > 1 else k).astype(np.float32)
    numpy_seconds = None
    if with_numpy and m * k <= 64 * 2**20:  # the float32 copy of the stream shape would be 8 GB
        dense = np.random.default_rng(2).standard_normal((m, k)).astype(np.float32)
        numpy_seconds = timings(lambda: x @ dense.T, min_time)[0]
    out = np.empty(x.shape[:-1] + (m,), np.float32)
    rows = []
    for path in paths:
        seconds, best = timings(lambda p=path: ops.matmul(x, w, out=out, path=p), min_time)
        rows.append(Row(m, k, n, ops.get_num_threads(), path, seconds, best, numpy_seconds))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'shape':>14}{'n':>5}{'threads':>8}  {'path':<11}{'us':>11}{'best us':>11}{'G w/s':>8}"
             f"{'vs numpy f32':>14}"]
    for r in rows:
        speedup = "-" if r.speedup is None else f"{r.speedup:.1f}x"
        lines.append(f"{r.m:>7}x{r.k:<6}{r.n:>5}{r.threads:>8}  {r.path:<11}{r.seconds * 1e6:>11.1f}"
                     f"{r.best_seconds * 1e6:>11.1f}{r.gweights_per_s:>8.1f}{speedup:>14}")
    return "\n".join(lines)


def default_paths() -> list[str]:
    """The selected kernel path, plus the portable one for comparison."""
    return list(dict.fromkeys([ops.KERNEL_PATH, cpu_features.PORTABLE]))


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend; DependencyError when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise errors.DependencyError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # write files only: no display is needed, or opened
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: str | Path) -> None:
    """Raise before any timing if :func:`plot` could not write ``path``: matplotlib missing
    (DependencyError), an image type it cannot write or a folder that does not exist (InvalidValueError)."""
    path = Path(path)
    supported = _pyplot().figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in supported:
        raise errors.InvalidValueError(f"cannot plot to {path}: its type {path.suffix or '(none)'!r} is not one of "
                                       f"{', '.join('.' + kind for kind in sorted(supported))}")
    if not path.parent.is_dir():
        raise errors.InvalidValueError(f"cannot plot to {path}: folder {path.parent} does not exist")


def plot(rows: list[Row], path: str | Path, title: str = "") -> None:
    """Bar chart of ``rows``: billions of weight x token products per second (median runs) for each
    shape, one bar per kernel path and one for numpy float32 where it was timed, on a log scale."""
    plt = _pyplot()
    shapes = list(dict.fromkeys((r.m, r.k, r.n) for r in rows))
    paths = list(dict.fromkeys(r.path for r in rows))
    series = {path: {(r.m, r.k, r.n): r.gweights_per_s for r in rows if r.path == path} for path in paths}
    series["numpy float32"] = {(r.m, r.k, r.n): r.m * r.k * r.n / r.numpy_seconds / 1e9
                               for r in rows if r.numpy_seconds is not None}
    height = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(8, 1 + 0.5 * len(shapes) * len(series) ** 0.5))
    for i, (label, values) in enumerate(series.items()):
        positions = [s + i * height for s, shape in enumerate(shapes) if shape in values]
        axes.barh(positions, [values[shape] for shape in shapes if shape in values], height, label=label)
    axes.set_yticks([s + 0.4 - height / 2 for s in range(len(shapes))],
                    [f"{m} x {k}, n = {n}" for m, k, n in shapes])
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("G weights/s (median run; higher is faster)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)

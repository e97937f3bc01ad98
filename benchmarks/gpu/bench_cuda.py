"""CUDA backend benchmark: ternary kernels (numba-cuda) against torch bf16 ``F.linear`` (cuBLAS).

Run on a machine with an NVIDIA GPU, numba-cuda and torch (a plain script, not asv)::

    python benchmarks/gpu/bench_cuda.py            # everything below (about a minute on an H200)
    python benchmarks/gpu/bench_cuda.py --quick    # fewer shapes
    python benchmarks/gpu/bench_cuda.py --profile  # a few launches of each kernel, for ncu

Both sides are measured in the same run, on the same card:

* **GPU us**: CUDA events around ``ITERS`` back-to-back calls queued behind a sleep kernel,
  so the CPU's launch cost shows no gaps; median of ``REPEATS`` such runs. Weights rotate
  among copies that together exceed ``ROTATE_BYTES`` (several times the L2), so every call
  streams its weights from device memory as in a real model.
* **wall us**: host clock over the same calls, synchronized at the end: what a Python decode
  loop sees, launch cost included.

It also checks, on the GPU, that results are bit-identical to the CPU kernels, measures the
device-to-device copy bandwidth, the decode kernel at other register caps and the variants of
``cuda_gemv_experiments.py``, the launch overhead, and a BitNet-2B block's seven decode
matmuls, plain and replayed from a CUDA graph (``bn.cuda.StepGraph``: one launch per step).
``cuda_device_check.sh`` runs it, with the tests, on a lent GPU machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import statistics
import time
import traceback

import cuda_gemv_experiments as experiments  # beside this script
import numpy as np
import torch
import torch.nn.functional as F
from numba import cuda

import bitnet as bn
from bitnet.cuda import backend, kernels

ROTATE_BYTES = 512 << 20
ITERS = 50
REPEATS = 7
SLEEP_CYCLES = 60_000_000  # ~30 ms at 2 GHz: longer than queueing ITERS launches takes

DECODE = [("20480x3200", 20480, 3200), ("2560x6912", 2560, 6912), ("lm head 128256x2560", 128256, 2560),
          ("6912x2560", 6912, 2560), ("2560x2560", 2560, 2560)]
PREFILL = [("6912x2560", 6912, 2560, 128), ("2560x6912", 2560, 6912, 128), ("20480x3200", 20480, 3200, 128)]
# One BitNet b1.58 2B4T layer: q, k, v, o, gate, up, down (out_features, in_features).
BLOCK = [(2560, 2560), (640, 2560), (640, 2560), (2560, 2560), (6912, 2560), (6912, 2560), (2560, 6912)]


def random_ternary(rng, m, k) -> bn.PackedTernary:
    codes = rng.integers(-1, 2, size=(m, k), dtype=np.int8)
    return bn.pack(bn.TernaryTensor(codes, np.float32(0.0123)), "i2")


def copies_for(nbytes: int) -> int:
    return max(1, math.ceil(ROTATE_BYTES / nbytes))


def time_calls(call, iters=ITERS, repeats=REPEATS):
    """(GPU us per call, wall us per call): medians over ``repeats`` runs of ``iters`` calls."""
    call(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu, wall = [], []
    for _ in range(repeats):
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        for i in range(iters):
            call(i)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) * 1e3 / iters)
        t0 = time.perf_counter()
        for i in range(iters):
            call(i)
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(gpu), statistics.median(wall)


def time_graph(graph, iters=20, repeats=REPEATS):
    """``time_calls`` for a StepGraph, which replays on its own stream: events on that stream."""
    graph.replay()
    graph.synchronize()
    start, end = cuda.event(), cuda.event()
    gpu, wall = [], []
    for _ in range(repeats):
        start.record(graph.stream)
        for _ in range(iters):
            graph.replay()
        end.record(graph.stream)
        end.synchronize()
        gpu.append(cuda.event_elapsed_time(start, end) * 1e3 / iters)
        t0 = time.perf_counter()
        for _ in range(iters):
            graph.replay()
        graph.synchronize()
        wall.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(gpu), statistics.median(wall)


def copy_bandwidth() -> float:
    """Device-to-device copy, TB/s counting bytes read plus written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us, _ = time_calls(lambda i: dst.copy_(src), iters=10, repeats=5)
    return 2 * src.numel() / (us * 1e-6) / 1e12


def uploaded_copies(p: bn.PackedTernary, count: int) -> list[backend.DeviceTernary]:
    """``count`` separate device copies of ``p`` (fresh PackedTernary objects: each uploads)."""
    return [backend.upload(bn.PackedTernary(p.format, p.shape, p.data, p.scale, p.granularity))
            for _ in range(count)]


def check_bit_exact(rng) -> list[str]:
    lines = []
    for m, k, n in [(20480, 3200, 1), (2560, 6912, 1), (6912, 2560, 128), (300, 50000, 1)]:
        p = random_ternary(rng, m, k)
        x = rng.standard_normal((n, k)).astype(np.float32)
        gpu = backend.matmul(x, p)
        same = np.array_equal(gpu, bn.matmul(x, p))
        q = bn.quantize_activations(x)[0]
        same_int = np.array_equal(backend.matmul_int(q, p), bn.matmul_int(q, p))
        pairs = zip(backend.quantize_activations(x), bn.quantize_activations(x), strict=True)
        same_q = all(np.array_equal(a, b, equal_nan=True) for a, b in pairs)
        lines.append(f"bit-exact vs CPU {m}x{k} n={n}: matmul {same}, matmul_int {same_int}, quantize {same_q}")
    return lines


def time_ternary(rng, m, k, n):
    p = random_ternary(rng, m, k)
    resident = uploaded_copies(p, copies_for(m * k // 4))
    x = cuda.to_device(rng.standard_normal((n, k)).astype(np.float32))
    out = cuda.device_array((n, m), np.float32)
    return time_calls(lambda i: bn.cuda.linear(x, resident[i % len(resident)], out=out))


def time_cublas(m, k, n):
    weights = [torch.randn((m, k), device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * m * k))]
    xb = torch.randn((n, k), device="cuda", dtype=torch.bfloat16)
    return time_calls(lambda i: F.linear(xb, weights[i % len(weights)]))


def bench_linear(rng, m, k, n) -> dict:
    t_gpu, t_wall = time_ternary(rng, m, k, n)
    b_gpu, b_wall = time_cublas(m, k, n)
    torch.cuda.empty_cache()
    return dict(t_gpu=t_gpu, t_wall=t_wall, b_gpu=b_gpu, b_wall=b_wall, tbytes=m * (k + 255) // 256 * 64)


def gemv_variants(rng, shapes=((20480, 3200), (128256, 2560), (2560, 6912))) -> list[str]:
    """GPU us of the decode kernel at 2, 3 and 4 resident blocks per SM, and of the experimental
    variants of cuda_gemv_experiments.py (checked bit-identical to the library kernel)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kernels_by_name = {f"lib {b}/SM": (kernels.make_quantize_gemv(b), b) for b in (2, 3, 4)}
    kernels_by_name.update({name: (kernel, 2) for name, kernel in experiments.VARIANTS.items()})
    rows = [f"  {'m x k':14s} " + " ".join(f"{name:>10s}" for name in kernels_by_name)]
    for m, k in shapes:
        resident = uploaded_copies(random_ternary(rng, m, k), copies_for(m * k // 4))
        x = cuda.to_device(rng.standard_normal((1, k)).astype(np.float32))
        reference = bn.cuda.linear(x, resident[0]).copy_to_host()
        cells = []
        for kernel, blocks in kernels_by_name.values():
            per_warp = max(1, -(-m // (sms * blocks * kernels.WARPS)))
            launch = kernel[(kernels.grid_rows(m, per_warp), 1), kernels.THREADS, 0, resident[0].kpad]
            out = cuda.device_array((1, m), np.float32)
            launch(x, k, resident[0].words, resident[0].scale, per_warp, out)
            same = np.array_equal(out.copy_to_host(), reference)
            cells.append(f"{time_calls(variant_call(launch, resident, x, out, per_warp))[0]:9.1f}{'' if same else '!'}")
        rows.append(f"  {f'{m}x{k}':14s} " + " ".join(f"{c:>10s}" for c in cells))
    rows.append("  (! = output differs from the library kernel)")
    return rows


def variant_call(launch, resident, x, out, per_warp):
    def call(i):
        w = resident[i % len(resident)]
        launch(x, w.shape[1], w.words, w.scale, per_warp, out)

    return call


def launch_overhead(rng) -> list[str]:
    """Host-side cost of one launch: an empty numba kernel, a raw GEMV launch, linear(), torch F.linear."""

    @cuda.jit
    def empty():
        pass

    p = random_ternary(rng, 2560, 2560)
    w = backend.upload(p)
    x = cuda.to_device(rng.standard_normal((1, 2560)).astype(np.float32))
    out = cuda.device_array((1, 2560), np.float32)
    grid = (kernels.grid_rows(2560, 1), 1)
    raw = kernels.quantize_gemv[grid, kernels.THREADS, 0, w.kpad]
    xb = torch.randn((1, 2560), device="cuda", dtype=torch.bfloat16)
    wb = torch.randn((2560, 2560), device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, call in [
        ("empty numba kernel", lambda i: empty[1, 32]()),
        ("raw quantize_gemv launch", lambda i: raw(x, 2560, w.words, w.scale, 1, out)),
        ("bn.cuda.linear (checks + launch)", lambda i: bn.cuda.linear(x, w, out=out)),
        ("torch F.linear bf16", lambda i: F.linear(xb, wb)),
    ]:
        gpu, wall = time_calls(call, iters=200, repeats=5)
        rows.append(f"  {name:34s} wall {wall:7.1f} us/call   GPU {gpu:7.1f} us/call")
    return rows


def decode_block(rng) -> list[str]:
    """The seven matmuls of one decode step of a BitNet-2B layer, back to back, weights resident."""
    packed = [random_ternary(rng, m, k) for m, k in BLOCK]
    resident = [backend.upload(p) for p in packed]
    xs = {k: cuda.to_device(rng.standard_normal((1, k)).astype(np.float32)) for k in {k for _, k in BLOCK}}
    outs = [cuda.device_array((1, m), np.float32) for m, _ in BLOCK]

    def step(stream=0):
        for (_, k), w, out in zip(BLOCK, resident, outs, strict=True):
            bn.cuda.linear(xs[k], w, out=out, stream=stream)

    wb = [torch.randn((m, k), device="cuda", dtype=torch.bfloat16) for m, k in BLOCK]
    xb = {k: torch.randn((1, k), device="cuda", dtype=torch.bfloat16) for k in xs}

    def torch_step(i):
        for (_, k), w in zip(BLOCK, wb, strict=True):
            F.linear(xb[k], w)

    rows = []
    t_gpu, t_wall = time_calls(lambda i: step(), iters=20)
    b_gpu, b_wall = time_calls(torch_step, iters=20)
    rows.append(f"  ternary, 7 launches: GPU {t_gpu:6.1f} us  wall {t_wall:6.1f} us")
    rows.append(f"  torch bf16:          GPU {b_gpu:6.1f} us  wall {b_wall:6.1f} us")
    try:
        graph = bn.cuda.StepGraph(step)
        reference = [o.copy_to_host() for o in outs]
        for o in outs:
            o.copy_to_device(np.zeros(o.shape, np.float32))
        graph.replay()
        graph.synchronize()
        same = all(np.array_equal(o.copy_to_host(), r) for o, r in zip(outs, reference, strict=True))
        g_gpu, g_wall = time_graph(graph)
        rows.append(f"  ternary, StepGraph:  GPU {g_gpu:6.1f} us  wall {g_wall:6.1f} us  (replay matches: {same})")
    except Exception as e:  # report, don't lose the rest of the run
        rows.append(f"  ternary, StepGraph: failed: {type(e).__name__}: {e}")
    return rows


def section(title, run) -> None:
    """Print a titled block of lines; a failure prints its traceback and the run goes on."""
    print(title + ":", flush=True)
    try:
        for line in run():
            print(line, flush=True)
    except Exception:
        traceback.print_exc()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--profile", action="store_true", help="only launch the kernels a few times (for ncu)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.profile:
        for m, k, n in [(20480, 3200, 1), (6912, 2560, 128)]:
            x = cuda.to_device(rng.standard_normal((n, k)).astype(np.float32))
            w = backend.upload(random_ternary(rng, m, k))
            for _ in range(3):
                bn.cuda.linear(x, w)
        m, k = 20480, 3200
        per_warp = -(-m // (torch.cuda.get_device_properties(0).multi_processor_count * 2 * kernels.WARPS))
        w = backend.upload(random_ternary(rng, m, k))
        x = cuda.to_device(rng.standard_normal((1, k)).astype(np.float32))
        out = cuda.device_array((1, m), np.float32)
        grid = (kernels.grid_rows(m, per_warp), 1)
        for kernel in experiments.VARIANTS.values():
            kernel[grid, kernels.THREADS, 0, w.kpad](x, k, w.words, w.scale, per_warp, out)
        cuda.synchronize()
        return
    props = torch.cuda.get_device_properties(0)
    print(f"card: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
          f"numba-cuda {importlib.metadata.version('numba-cuda')}; "
          f"torch stream handle {torch.cuda.current_stream().cuda_stream}")
    section("device copy", lambda: [f"  {copy_bandwidth():.2f} TB/s (read + write)"])
    section("bit-exactness on the GPU", lambda: check_bit_exact(rng))
    section("decode kernel variants, GPU us", lambda: gemv_variants(rng))
    decode = DECODE[:3] if args.quick else DECODE
    prefill = PREFILL[:1] if args.quick else PREFILL
    header = (f"{'shape (m x k)':22s} {'n':>4s} {'ternary GPU us':>15s} {'wall us':>8s} {'weights TB/s':>13s} "
              f"{'cuBLAS bf16 us':>15s} {'wall us':>8s} {'speedup':>8s}")
    print(header)
    print("-" * len(header))
    for name, m, k, n in [(nm, m, k, 1) for nm, m, k in decode] + prefill:
        try:
            r = bench_linear(rng, m, k, n)
        except Exception:
            traceback.print_exc()
            continue
        print(f"{name:22s} {n:4d} {r['t_gpu']:15.1f} {r['t_wall']:8.1f} {r['tbytes'] / r['t_gpu'] / 1e6:13.2f} "
              f"{r['b_gpu']:15.1f} {r['b_wall']:8.1f} {r['b_gpu'] / r['t_gpu']:7.2f}x", flush=True)
    section("launch overhead (host side, n=1, 2560x2560)", lambda: launch_overhead(rng))
    section("decode step of one BitNet-2B layer (7 matmuls, n=1)", lambda: decode_block(rng))


if __name__ == "__main__":
    main()

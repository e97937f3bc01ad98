"""Every Metal shader, run through the CPU emulation of MSL, against the Numba kernels.

The emulation dispatches like metalcompute: a 1-D grid of whole threadgroups (the threads
past ``count`` run too), the pipeline's threadgroup width (tested at several multiples of
32), the threads of a threadgroup running concurrently as fibers. Integer results must be
bit-identical to ``bn.quantize_activations`` / ``bn.matmul_int``.
"""

from __future__ import annotations

import numpy as np
import pytest

import bitnet as bn
from bitnet.metal import bridge, shaders
from bitnet.metal.emulation import EmulationError, find_compiler, metalcompute_module

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no g++: the MSL emulation compiles shaders as C++")

WIDTHS = [32, 64, 256, 1024]
"""Threadgroup widths metalcompute may pick (the pipeline's maximum, a multiple of 32)."""


@pytest.fixture(scope="module", params=[(w, False) for w in WIDTHS] + [(96, True), (1024, True)],
                ids=lambda p: f"width{p[0]}" + ("-reversed" if p[1] else ""))
def device(request):
    """An emulated device; the reversed ones run the lanes in reverse order between barriers."""
    width, reverse = request.param
    return metalcompute_module(width, reverse).Device()


def run(device, kernel: str, count: int, *arrays) -> list:
    """Dispatch ``kernel`` over fresh device copies of ``arrays``; returns the buffers."""
    buffers = [device.buffer(a) for a in arrays]
    device.kernel(shaders.source(shaders.LIBRARY_OF_KERNEL[kernel])).function(kernel)(count, *buffers)
    return buffers


def padded_width(k: int) -> int:
    return -(-k // 256) * 256


# ------------------------------------------------------------------ activation quantization


def awkward_activations(rng, n, k):
    x = (rng.standard_normal((n, k)) * rng.uniform(0.01, 100, (n, 1))).astype(np.float32)
    if n >= 4:
        x[1] = 0.0                                   # absmax clamped to 1e-5
        x[2, k // 2] = np.nan                        # a = NaN, q = 0
        x[3, -1] = -np.inf
    if n >= 5 and k >= 6:
        x[4, :6] = [127.0, 0.5, 1.5, 2.5, -0.5, -126.5]  # a = 1: ties must round half to even
    return x


@pytest.mark.parametrize("n, k", [(1, 1), (1, 256), (5, 300), (7, 513), (33, 31)])
def test_quantize_is_bit_identical(device, rng, n, k):
    x = awkward_activations(rng, n, k)
    stride = padded_width(k)
    q_buf, a_buf = run(device, "quantize_activations", n * 32,
                       x, np.full((n, stride), 99, np.int8), np.zeros(n, np.float32),
                       np.array([n, k, stride], np.uint32))[1:3]
    q = np.frombuffer(q_buf, np.int8).reshape(n, stride)
    a = np.frombuffer(a_buf, np.float32)
    q_ref, a_ref = bn.quantize_activations(x)
    np.testing.assert_array_equal(q[:, :k], q_ref)
    np.testing.assert_array_equal(q[:, k:], 0)   # the padding the matmul kernels read
    np.testing.assert_array_equal(a.view(np.uint32), a_ref.reshape(-1).view(np.uint32))


# ------------------------------------------------------------------ ternary GEMV / GEMM


def matmul_inputs(rng, n, m, k, granularity):
    w = rng.standard_normal((m, k)).astype(np.float32)
    p = bn.pack(bn.quantize_weights(w, granularity=granularity), "i2")
    q = rng.integers(-128, 128, (n, k), dtype=np.int8)
    q[0, : min(k, 3)] = -128                          # the extremes of int8
    padded = np.zeros((n, padded_width(k)), np.int8)
    padded[:, :k] = q
    a = rng.uniform(0.5, 200, n).astype(np.float32)
    return p, q, padded, a


def dispatch_matmul(device, kernel, p, padded, a, scaled):
    n, m = padded.shape[0], p.shape[0]
    blocks = padded.shape[1] // 256
    flags = (bridge.FLAG_SCALED if scaled else 0) | (bridge.FLAG_SCALE_PER_ROW if p.granularity == "channel" else 0)
    if kernel == "ternary_gemv":
        count = n * -(-m // bridge.GEMV_ROWS) * 32
    else:
        count = -(-m // bridge.TILE_ROWS) * -(-n // bridge.TILE_TOKENS) * bridge.GEMM_GROUP_THREADS
    out = run(device, kernel, count, p.data, padded, a, p.scale.reshape(-1), np.zeros((n, m), np.uint32),
              np.array([n, m, blocks, flags], np.uint32))[4]
    return np.frombuffer(out, np.float32 if scaled else np.int32).reshape(n, m)


SHAPES = {
    "ternary_gemv": [(1, 1, 1), (1, 5, 257), (2, 33, 512), (3, 45, 300), (4, 70, 1000)],
    "ternary_gemm": [(1, 1, 1), (5, 3, 255), (33, 31, 300), (40, 70, 513), (64, 64, 256)],
}


@pytest.mark.parametrize("kernel, shape", [(k, s) for k, shapes in SHAPES.items() for s in shapes],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_matmul_kernels_match_cpu(device, rng, kernel, shape, granularity):
    n, m, k = shape
    p, q, padded, a = matmul_inputs(rng, n, m, k, granularity)
    acc = dispatch_matmul(device, kernel, p, padded, a, scaled=False)
    np.testing.assert_array_equal(acc, bn.matmul_int(q, p))
    y = dispatch_matmul(device, kernel, p, padded, a, scaled=True)
    scale = p.scale.reshape(-1) if granularity == "channel" else p.scale
    expected = acc.astype(np.float32) / a[:, None] * scale   # float32, each operation rounded once
    np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))   # precise::divide


def test_kernels_agree_with_each_other_on_any_width(rng):
    """GEMV and GEMM, each at every width, give the same integers on one input."""
    p, q, padded, a = matmul_inputs(rng, 6, 37, 700, "tensor")
    results = [dispatch_matmul(metalcompute_module(width).Device(), kernel, p, padded, a, scaled=False)
               for width in (32, 160, 992) for kernel in SHAPES]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


@pytest.mark.slow
def test_fuzz_random_shapes_and_widths(rng):
    for _ in range(60):
        n, m, k = (int(v) for v in rng.integers(1, [80, 150, 1300]))
        width = 32 * int(rng.integers(1, 33))
        device = metalcompute_module(width, reverse=bool(rng.integers(2))).Device()
        p, q, padded, a = matmul_inputs(rng, n, m, k, ["tensor", "channel"][int(rng.integers(2))])
        for kernel in SHAPES:
            np.testing.assert_array_equal(dispatch_matmul(device, kernel, p, padded, a, scaled=False),
                                          bn.matmul_int(q, p), err_msg=f"{kernel} {n}x{m}x{k} width {width}")
        x = awkward_activations(rng, n, k)
        stride = padded_width(k)
        q_buf, a_buf = run(device, "quantize_activations", n * 32, x, np.zeros((n, stride), np.int8),
                           np.zeros(n, np.float32), np.array([n, k, stride], np.uint32))[1:3]
        q_ref, a_ref = bn.quantize_activations(x)
        np.testing.assert_array_equal(np.frombuffer(q_buf, np.int8).reshape(n, stride)[:, :k], q_ref)
        np.testing.assert_array_equal(np.frombuffer(a_buf, np.float32), a_ref.reshape(-1))


# ------------------------------------------------------------------ the emulator itself

PROBE = """
#include <metal_stdlib>
using namespace metal;

kernel void simd_functions(device const int* in [[buffer(0)]], device int* out [[buffer(1)]],
                           uint gid [[thread_position_in_grid]], uint lane [[thread_index_in_simdgroup]])
{
    const int v = in[gid];
    out[gid * 8 + 0] = simd_sum(v);
    out[gid * 8 + 1] = simd_max(v);
    out[gid * 8 + 2] = simd_min(v);
    out[gid * 8 + 3] = simd_shuffle(v, ushort((lane * 7 + 3) % 32));
    out[gid * 8 + 4] = simd_shuffle_xor(v, ushort(5));
    out[gid * 8 + 5] = simd_shuffle_down(v, ushort(3));
    out[gid * 8 + 6] = simd_shuffle_up(v, ushort(2));
    out[gid * 8 + 7] = simd_broadcast(v, ushort(9));
}

kernel void reverse_threadgroup(device const int* in [[buffer(0)]], device int* out [[buffer(1)]],
                                uint gid [[thread_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                                uint width [[threads_per_threadgroup]])
{
    threadgroup int staged[1024];
    staged[tid] = in[gid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[gid] = staged[width - 1 - tid];
}

kernel void racy_neighbour(device const int* in [[buffer(0)]], device int* out [[buffer(1)]],
                           uint gid [[thread_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                           uint width [[threads_per_threadgroup]])
{
    threadgroup int staged[1024];
    staged[tid] = in[gid];
    out[gid] = staged[(tid + 1) % width];   // no barrier: a data race
}

kernel void returns_before_barrier(device int* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]])
{
    if (tid == 3) {
        return;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = 1;
}

kernel void no_bounds_check(device int* out [[buffer(0)]], uint gid [[thread_position_in_grid]])
{
    out[gid] = 1;
}

kernel void reads_one_past(device const int* in [[buffer(0)]], device int* out [[buffer(1)]],
                           uint gid [[thread_position_in_grid]])
{
    if (gid < 10) {
        out[gid] = in[gid + 1];
    }
}

kernel void pointer_arithmetic(device int* in [[buffer(0)]], device int* out [[buffer(1)]],
                               uint gid [[thread_position_in_grid]])
{
    const device int* p = 2 + in;   // device int* to const device int*, as in MSL
    p += gid;
    out[gid] = *(p - 2);
}

kernel void escaped_address(device int* out [[buffer(0)]], uint gid [[thread_position_in_grid]])
{
    int* plain = &out[0];   // Apple's compiler rejects this; the emulation's pointers cannot see it
    plain[gid] = 1;
}

kernel void too_much_threadgroup_memory(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]])
{
    threadgroup float staged[4096];
    threadgroup float4 more[2049];
    staged[tid] = 1.0f;
    more[tid] = float4(2.0f);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = staged[tid] + more[tid].x;
}

kernel void grid_ids(device uint* out [[buffer(0)]], uint gid [[thread_position_in_grid]],
                     uint group [[threadgroup_position_in_grid]], uint groups [[threadgroups_per_grid]],
                     uint threads [[threads_per_grid]], uint simdgroup [[simdgroup_index_in_threadgroup]])
{
    out[gid * 4 + 0] = group;
    out[gid * 4 + 1] = groups;
    out[gid * 4 + 2] = threads;
    out[gid * 4 + 3] = simdgroup;
}
"""


def probe(width, name, count, *arrays, reverse=False):
    device = metalcompute_module(width, reverse).Device()
    buffers = [device.buffer(a) for a in arrays]
    device.kernel(PROBE).function(name)(count, *buffers)
    return buffers


def test_simd_functions_follow_msl(rng):
    values = rng.integers(-1000, 1000, 64).astype(np.int32)
    out = np.frombuffer(probe(64, "simd_functions", 64, values, np.zeros(64 * 8, np.int32))[1], np.int32)
    out = out.reshape(64, 8)
    for g in range(2):
        v = values[32 * g : 32 * g + 32]
        lanes = np.arange(32)
        got = out[32 * g : 32 * g + 32]
        np.testing.assert_array_equal(got[:, 0], v.sum())
        np.testing.assert_array_equal(got[:, 1], v.max())
        np.testing.assert_array_equal(got[:, 2], v.min())
        np.testing.assert_array_equal(got[:, 3], v[(lanes * 7 + 3) % 32])
        np.testing.assert_array_equal(got[:, 4], v[lanes ^ 5])
        np.testing.assert_array_equal(got[:, 5], np.where(lanes + 3 < 32, v[np.minimum(lanes + 3, 31)], v))
        np.testing.assert_array_equal(got[:, 6], np.where(lanes >= 2, v[np.maximum(lanes - 2, 0)], v))
        np.testing.assert_array_equal(got[:, 7], v[9])


@pytest.mark.parametrize("width", [32, 256])
def test_barrier_shares_threadgroup_memory(width):
    values = np.arange(2 * width, dtype=np.int32) * 3 + 1
    out = np.frombuffer(probe(width, "reverse_threadgroup", 2 * width, values, np.zeros_like(values))[1], np.int32)
    np.testing.assert_array_equal(out, values.reshape(2, width)[:, ::-1].reshape(-1))


def test_a_missing_barrier_shows_as_order_dependent_results():
    values = np.arange(64, dtype=np.int32) + 1000
    forward, backward = (
        np.frombuffer(probe(64, "racy_neighbour", 64, values, np.zeros_like(values), reverse=r)[1], np.int32)
        for r in (False, True)
    )
    assert not np.array_equal(forward, backward)


def test_buffer_pointers_do_pointer_arithmetic():
    values = np.arange(32, dtype=np.int32) * 5
    np.testing.assert_array_equal(np.frombuffer(probe(32, "pointer_arithmetic", 32, values, np.zeros(32, np.int32))[1],
                                                np.int32), values)


def test_grid_runs_whole_threadgroups_past_count():
    out = np.frombuffer(probe(64, "grid_ids", 65, np.zeros(128 * 4, np.uint32))[0], np.uint32).reshape(128, 4)
    np.testing.assert_array_equal(out[:, 0], np.arange(128) // 64)   # 2 threadgroups for 65 threads
    np.testing.assert_array_equal(out[:, 1:3], [[2, 128]] * 128)
    np.testing.assert_array_equal(out[:, 3], np.arange(128) % 64 // 32)


def test_emulator_reports_what_the_gpu_would_not_run():
    with pytest.raises(EmulationError, match="returned before it"):
        probe(64, "returns_before_barrier", 64, np.zeros(64, np.int32))
    with pytest.raises(EmulationError, match="thread 10 accessed element 10 of buffer 0, which holds 10 elements"):
        probe(64, "no_bounds_check", 10, np.zeros(10, np.int32))   # threads 10..63 run too
    with pytest.raises(EmulationError, match="thread 9 accessed element 10 of buffer 0, which holds 10 elements"):
        probe(32, "reads_one_past", 32, np.zeros(10, np.int32), np.zeros(10, np.int32))
    with pytest.raises(EmulationError, match="wrote outside buffer 0"):
        probe(64, "escaped_address", 64, np.zeros(10, np.int32))   # caught by the guard bytes
    with pytest.raises(EmulationError, match=r"take 49168 bytes, more than the 32768"):
        metalcompute_module(64).Device().kernel(PROBE).function("too_much_threadgroup_memory")
    with pytest.raises(EmulationError, match="binds 2 buffers, the dispatch passed 1"):
        probe(32, "reverse_threadgroup", 32, np.zeros(32, np.int32))
    with pytest.raises(EmulationError, match="not a multiple of 32"):
        probe(48, "no_bounds_check", 48, np.zeros(48, np.int32))

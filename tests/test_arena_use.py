"""Steady-state matmul and layer calls take their temporaries from arenas and allocate nothing new."""

import threading
import tracemalloc

import numpy as np
import pytest
from conftest import ALL_PATHS

import bitnet as bn
from bitnet import ops
from bitnet.kernels import matmul as kernels

# Every numpy buffer in these tests is larger than this, so a traced peak below it means
# no array was allocated (only small Python objects).
NO_ARRAY_BYTES = 4096


def traced_peak(fn, repeats=50):
    tracemalloc.start()
    try:
        for _ in range(repeats):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_repeated_matmul_with_out_allocates_nothing(rng):
    w = bn.pack(bn.quantize_weights(rng.standard_normal((1200, 2000)).astype(np.float32)), "tq2_0")
    for n in (1, 5):
        x = rng.standard_normal((n, 2000)).astype(np.float32)
        out = np.empty((n, 1200), np.float32)
        bn.matmul(x, w, out=out)
        expected = out.copy()
        misses = ops.WORKSPACE_ARENA.miss_count()
        assert traced_peak(lambda x=x, out=out: bn.matmul(x, w, out=out)) < NO_ARRAY_BYTES
        assert ops.WORKSPACE_ARENA.miss_count() == misses
        assert np.array_equal(out, expected)


def test_workspaces_are_reused_and_bounded(rng):
    w = bn.pack(bn.quantize_weights(rng.standard_normal((40, 300)).astype(np.float32)))
    for n in range(1, 12):  # more shapes than are kept: the oldest go back to the arena
        bn.matmul(rng.standard_normal((n, 300)).astype(np.float32), w)
    held = ops.WORKSPACE_ARENA.stats().live_arrays
    per_shape = 3 + len(kernels.scratch_shapes(ops.KERNEL_PATH, 1, 256))  # activations, scales, sums; scratch
    assert held == per_shape * ops._WORKSPACE_SHAPES
    bn.matmul(rng.standard_normal((11, 300)).astype(np.float32), w)
    assert ops.WORKSPACE_ARENA.stats().live_arrays == held


def test_repeated_layer_steps_allocate_nothing(rng):
    layer = bn.nn.BitLinear.from_float(rng.standard_normal((1500, 1100)).astype(np.float32))
    x = rng.standard_normal((3, 1100)).astype(np.float32)
    arena = bn.default_arena()

    def one_step():
        with bn.nn.step():
            y = layer(x)
            assert y.shape == (3, 1500)

    one_step()
    misses, used = arena.miss_count(), arena.used_bytes()
    assert traced_peak(one_step) < NO_ARRAY_BYTES
    assert arena.miss_count() == misses and arena.used_bytes() == used


def test_layer_outside_a_step_returns_caller_owned_arrays(rng):
    layer = bn.nn.BitLinear.from_float(rng.standard_normal((30, 50)).astype(np.float32))
    x = rng.standard_normal((2, 50)).astype(np.float32)
    used = bn.default_arena().used_bytes()
    first, second = layer(x), layer(x)
    assert not np.shares_memory(first, second) and np.array_equal(first, second)
    assert bn.default_arena().used_bytes() == used


def entry_arrays(path, n, k_padded):
    """Arrays the compiled entry of ``path`` takes: 8, then its scratch. Numba wraps each one it receives
    from Python in a small header (an NRT allocation holding no data); any allocation beyond those is
    a kernel buffer."""
    return 8 + len(kernels.scratch_shapes(path, n, k_padded))


def numba_allocations(fn, repeats=5):
    """NRT allocations per call of ``fn`` (numba's counters, switched on for the measurement)."""
    from numba.core.runtime import _nrt_python, rtsys

    was_on = _nrt_python.memsys_stats_enabled()
    _nrt_python.memsys_enable_stats()
    try:
        before = rtsys.get_allocation_stats().alloc
        for _ in range(repeats):
            fn()
        return (rtsys.get_allocation_stats().alloc - before) / repeats
    finally:
        if not was_on:
            _nrt_python.memsys_disable_stats()


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("n", [1, 8, 40])
def test_repeated_matmul_with_out_allocates_nothing_on_any_path(rng, path, n):
    """Measured per path and batch size with tracemalloc (which also traces numba's buffers) and
    numba's allocation counters: the GEMV loop (n = 1), the 8-token GEMM tiles, the AMX tiles
    (40 tokens on amx) and the portable loops all take their scratch from the workspace."""
    w = bn.pack(bn.quantize_weights(rng.standard_normal((100, 600)).astype(np.float32)), "i2")
    x = rng.standard_normal((n, 600)).astype(np.float32)
    out = np.empty((n, 100), np.float32)
    bn.matmul(x, w, out=out, path=path)
    expected = out.copy()
    misses = ops.WORKSPACE_ARENA.miss_count()
    peak = traced_peak(lambda: bn.matmul(x, w, out=out, path=path))  # numba's buffers are traced too
    allocations = numba_allocations(lambda: bn.matmul(x, w, out=out, path=path))
    assert ops.WORKSPACE_ARENA.miss_count() == misses and np.array_equal(out, expected)
    assert peak < NO_ARRAY_BYTES and allocations == entry_arrays(path, n, 768)


def test_a_finished_thread_gives_its_matmul_workspaces_back(rng):
    w = bn.pack(bn.quantize_weights(rng.standard_normal((40, 300)).astype(np.float32)))
    x = rng.standard_normal((3, 300)).astype(np.float32)
    live = ops.WORKSPACE_ARENA.stats().live_arrays
    worker = threading.Thread(target=bn.matmul, args=(x, w))
    worker.start()
    worker.join()
    del worker
    assert ops.WORKSPACE_ARENA.stats().live_arrays == live

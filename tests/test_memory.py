"""Arena allocator: alignment, reuse, frames, limits, stats, backends, threads, debug mode.

Facts come from outside the arena where possible: addresses (``ctypes.data``),
``np.shares_memory``, ``tracemalloc`` and the calls a backend actually received.
"""

import doctest
import sys
import threading
import tracemalloc

import numpy as np
import pytest

import bitnet as bn
import bitnet.memory.arena
import bitnet.memory.backend
from bitnet.memory import ALIGNMENT, DEBUG_ENV, POISON_BYTE, CPUBlocks, huge_pages
from bitnet.memory.pools import LARGE_BLOCK, LARGE_GRAIN, SMALL_LIMIT, size_class

KiB, MiB = 1024, 1024 * 1024


def address(a):
    return a.ctypes.data


class RecordingBlocks(CPUBlocks):
    """CPU blocks that remember every allocate and free call, so tests can count them."""

    name = "recording"

    def __init__(self):
        self.allocated = []
        self.freed = []

    def allocate(self, nbytes):
        block = super().allocate(nbytes)
        self.allocated.append(nbytes)
        return block

    def free(self, block):
        self.freed.append(block.nbytes)


class WholeBuffer:
    """A raw block handle like metalcompute's: an opaque object that owns its bytes."""

    def __init__(self, nbytes):
        self.nbytes = nbytes
        self.memory = CPUBlocks().allocate(nbytes)


class WholeBlocks:
    """A fake backend that, like metalcompute, can only bind whole buffers (no offsets)."""

    name = "whole"
    supports_offsets = False

    def __init__(self):
        self.allocated = []
        self.freed = []

    def allocate(self, nbytes):
        self.allocated.append(nbytes)
        return WholeBuffer(nbytes)

    def view(self, block, offset, shape, dtype):
        assert offset == 0, "an arena must never carve a backend without offsets"
        return np.ndarray(shape, dtype, buffer=block.memory, offset=0)

    def free(self, block):
        self.freed.append(block.nbytes)


# ---------------------------------------------------------------- arrays handed out


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((), np.float32),
        (0, np.int8),
        (1, np.int8),
        ((3, 5), np.float64),
        ((7, 2560), np.int8),
        ((64, 1024), np.float32),
        ((1000, 1000), np.float32),
        ((3, 5, 7), np.int32),
        (5, np.float16),
    ],
)
def test_arrays_are_aligned_plain_contiguous_and_writable(shape, dtype):
    arena = bn.Arena()
    arrays = [arena.empty(shape, dtype) for _ in range(3)] + [arena.zeros(shape, dtype)]
    for a in arrays:
        assert type(a) is np.ndarray
        assert address(a) % ALIGNMENT == 0
        assert a.shape == np.empty(shape).shape
        assert a.dtype == np.dtype(dtype)
        assert a.flags.c_contiguous and a.flags.writeable
    assert not arrays[-1].any()


def test_live_arrays_never_share_memory(rng):
    arena = bn.Arena()
    sizes = rng.integers(1, 3 * SMALL_LIMIT, size=60)
    arrays = [arena.empty(int(n), np.uint8) for n in sizes]
    for i, a in enumerate(arrays):
        a.fill(i % 251)
    for i, a in enumerate(arrays):
        assert (a == i % 251).all()
        for b in arrays[i + 1 :]:
            assert not np.shares_memory(a, b)


@pytest.mark.parametrize("nbytes", [1, 4 * KiB, SMALL_LIMIT, SMALL_LIMIT + 1, 3 * MiB, 64 * MiB])
def test_a_released_buffer_is_handed_back_for_the_same_size(nbytes):
    arena = bn.Arena()
    a = arena.empty(nbytes, np.uint8)
    first = address(a)
    arena.release(a)
    misses = arena.miss_count()
    b = arena.empty(nbytes, np.uint8)
    assert address(b) == first
    assert arena.miss_count() == misses
    assert arena.hit_count() == 1


def test_empty_accepts_shape_spellings_and_rejects_bad_ones():
    arena = bn.Arena()
    assert arena.empty(np.int64(4)).shape == (4,)
    assert arena.empty((np.int32(3), np.int64(1000)), np.float32).shape == (3, 1000)
    with pytest.raises(bn.ShapeError, match="integers"):
        arena.empty((2.5, 3))
    assert arena.empty([2, 3], "int16").shape == (2, 3)
    assert arena.empty((2,), [("x", "f4"), ("y", "i4")]).dtype.names == ("x", "y")
    for bad in [(3, -1), (-2, -3), -5]:
        with pytest.raises(bn.ShapeError, match="negative"):
            arena.empty(bad)
    with pytest.raises(bn.DTypeError, match="object"):
        arena.empty(3, object)
    assert arena.stats().live_arrays == 4


# ---------------------------------------------------------------- size classes and carving


def test_size_classes():
    expected = {0: 64, 1: 64, 64: 64, 65: 128, 4096: 4096, 4097: 8192, SMALL_LIMIT: SMALL_LIMIT}
    assert {n: size_class(n) for n in expected} == expected
    quarter = SMALL_LIMIT // 4
    assert size_class(SMALL_LIMIT + 1) == SMALL_LIMIT + quarter
    assert size_class(2 * SMALL_LIMIT) == 2 * SMALL_LIMIT
    assert size_class(2 * SMALL_LIMIT + 1) == 2 * SMALL_LIMIT + 2 * quarter
    for n in range(1, 20 * MiB, 99_991):
        assert n <= size_class(n) < max(2 * n, 128)
        assert size_class(n) % ALIGNMENT == 0


def test_large_requests_are_carved_from_one_block_and_coalesce_back():
    backend = RecordingBlocks()
    arena = bn.Arena(backend=backend)
    n = MiB
    a, b, c = (arena.empty(n, np.uint8) for _ in range(3))
    assert backend.allocated == [LARGE_BLOCK]
    assert arena.block_of(a) is arena.block_of(b) is arena.block_of(c)
    assert [arena.offset_of(x) for x in (a, b, c)] == [0, n, 2 * n]
    assert [address(x) - address(a) for x in (b, c)] == [n, 2 * n]

    arena.release(b)  # a hole in the middle: the block is not whole, nothing to give back
    assert arena.free_all_blocks() == 0
    arena.release(a)
    arena.release(c)
    assert arena.free_all_blocks() == LARGE_BLOCK  # the three pieces and the tail merged into one
    assert backend.freed == [LARGE_BLOCK]
    assert arena.total_bytes() == 0


def test_a_merged_hole_serves_a_bigger_request_without_a_new_block():
    backend = RecordingBlocks()
    arena = bn.Arena(backend=backend)
    pieces = [arena.empty(MiB, np.uint8) for _ in range(4)]
    arena.release(pieces[1])
    arena.release(pieces[2])
    big = arena.empty(2 * MiB, np.uint8)
    assert address(big) == address(pieces[1])
    assert backend.allocated == [LARGE_BLOCK]


def test_a_mix_of_sizes_reaches_a_steady_state(rng):
    # The same random workload, repeated: after the first rounds every request is a hit and the
    # arena stops growing, i.e. fragmentation is bounded.
    arena = bn.Arena()
    sizes = rng.integers(1, 6 * MiB, size=40)
    order = rng.permutation(40)

    def one_round():
        live = {}
        for i, j in enumerate(order):
            live[i] = arena.empty(int(sizes[i]), np.uint8)
            if j in live:
                arena.release(live.pop(j))
        for a in live.values():
            arena.release(a)

    totals = []
    for _ in range(6):
        one_round()
        totals.append(arena.total_bytes())
    misses = arena.miss_count()
    one_round()
    assert arena.miss_count() == misses
    assert arena.total_bytes() == totals[-1] == totals[-2]
    assert totals[-1] <= 2 * int(sizes.sum()) + LARGE_BLOCK


# ---------------------------------------------------------------- backends without offsets


def test_a_backend_without_offsets_gets_whole_blocks_reused_by_size_class():
    backend = WholeBlocks()
    arena = bn.Arena(backend=backend)
    sizes = [100, 5000, SMALL_LIMIT + 1, 3 * MiB, 3 * MiB]
    arrays = [arena.empty(n, np.uint8) for n in sizes]
    assert backend.allocated == [size_class(n) for n in sizes]
    blocks = [arena.block_of(a) for a in arrays]
    assert all(isinstance(b, WholeBuffer) for b in blocks)
    assert len({id(b) for b in blocks}) == len(blocks)
    assert all(arena.offset_of(a) == 0 for a in arrays)
    assert all(np.shares_memory(a, b.memory) for a, b in zip(arrays, blocks, strict=True))

    arena.release(arrays[3])
    again = arena.empty(3 * MiB - 100, np.uint8)  # same size class: the same whole buffer
    assert arena.block_of(again) is blocks[3]
    assert len(backend.allocated) == len(sizes)

    arena.release(again)
    assert arena.free_all_blocks() == size_class(3 * MiB)
    assert backend.freed == [size_class(3 * MiB)]


# ---------------------------------------------------------------- frames


def test_a_frame_releases_what_was_allocated_inside_it():
    arena = bn.Arena()
    arena.empty(10)  # allocated outside the frame: stays live
    with arena.frame():
        inside = [arena.empty(n) for n in (10, 1000, 10**6)]
        assert arena.stats().live_arrays == 4
    assert arena.stats().live_arrays == 1
    assert arena.used_bytes() == size_class(40)
    again = [arena.empty(n) for n in (10, 1000, 10**6)]  # the frame's memory came back to the pool
    assert sorted(map(address, again)) == sorted(map(address, inside))
    assert arena.miss_count() == 4


def test_nested_frames_release_only_their_own_arrays():
    arena = bn.Arena()
    with arena.frame():
        outer = arena.empty(100)
        with arena.frame():
            inner = arena.empty(100)
            assert arena.stats().live_arrays == 2
        assert arena.stats().live_arrays == 1
        assert arena.block_of(outer) is not None
        with pytest.raises(bn.ArenaDoubleReleaseError):
            arena.release(inner)
    assert arena.stats().live_arrays == 0


def test_a_frame_skips_arrays_released_by_hand_and_releases_on_exceptions():
    arena = bn.Arena()
    with pytest.raises(KeyError), arena.frame():
        a = arena.empty(100)
        arena.release(a)
        arena.empty(200)
        raise KeyError("boom")
    assert arena.stats().live_arrays == 0
    assert arena.used_bytes() == 0


def test_keep_moves_an_array_to_the_enclosing_frame_or_to_the_caller():
    arena = bn.Arena()
    with arena.frame():
        with arena.frame() as inner:
            kept = inner.keep(arena.empty(10))
            arena.empty(10)
        assert arena.stats().live_arrays == 1
        assert arena.offset_of(kept) == 0
    assert arena.stats().live_arrays == 0

    with arena.frame() as step:
        result = step.keep(arena.zeros(10))
        with pytest.raises(bn.ArenaForeignArrayError):
            step.keep(np.zeros(10, np.float32))
    assert arena.stats().live_arrays == 1
    arena.release(result)


def test_frames_are_per_thread():
    arena = bn.Arena()
    other = {}

    def allocate_elsewhere():
        other["array"] = arena.empty(100)

    with arena.frame():
        worker = threading.Thread(target=allocate_elsewhere)
        worker.start()
        worker.join()
    assert arena.stats().live_arrays == 1  # the other thread had no frame: its array is still live
    arena.release(other["array"])


def test_frames_must_end_in_order():
    arena = bn.Arena()
    outer, inner = arena.frame(), arena.frame()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(bn.ArenaError, match="reverse order"):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    with outer, pytest.raises(bn.ArenaError, match="already active"):
        outer.__enter__()


# ---------------------------------------------------------------- stats


def test_stats_arithmetic():
    backend = RecordingBlocks()
    arena = bn.Arena(backend=backend)
    small = arena.empty(1000, np.float32)  # 4000 bytes -> the 4096 class
    large = arena.empty(SMALL_LIMIT + 1, np.uint8)  # rounded up to the grain, carved from a new block
    large_size = -(-(SMALL_LIMIT + 1) // LARGE_GRAIN) * LARGE_GRAIN
    s = arena.stats()
    assert s.used_bytes == 4096 + large_size
    assert s.total_bytes == sum(backend.allocated) == 4096 + LARGE_BLOCK
    assert s.free_bytes == s.total_bytes - s.used_bytes == LARGE_BLOCK - large_size
    assert s.peak_bytes == s.used_bytes
    assert (s.hits, s.misses, s.live_arrays, s.limit) == (0, 2, 2, None)
    assert (arena.used_bytes(), arena.free_bytes(), arena.total_bytes(), arena.peak_bytes()) == (
        s.used_bytes,
        s.free_bytes,
        s.total_bytes,
        s.peak_bytes,
    )

    arena.release(large)
    assert arena.used_bytes() == 4096
    assert arena.peak_bytes() == s.peak_bytes
    arena.reset_peak()
    assert arena.peak_bytes() == 4096
    arena.release(small)
    arena.empty(1000, np.float32)
    assert (arena.hit_count(), arena.miss_count()) == (1, 2)
    assert arena.free_all_blocks() == LARGE_BLOCK
    assert arena.total_bytes() == 4096 == arena.used_bytes()
    assert arena.free_bytes() == 0


def test_default_arena_is_one_per_process():
    assert isinstance(bn.default_arena(), bn.Arena)
    assert bn.default_arena() is bn.default_arena()
    assert "Arena" in bn.__all__ and "default_arena" in bn.__all__


# ---------------------------------------------------------------- limit


def test_going_over_the_limit_raises_and_leaves_the_arena_unchanged():
    backend = RecordingBlocks()
    arena = bn.Arena(backend=backend, limit=3 * MiB)
    kept = arena.empty(MiB, np.uint8)
    arena.release(arena.empty(1000, np.uint8))  # a pooled block that could not make enough room
    before = arena.stats()
    with pytest.raises(bn.ArenaLimitError, match="over its limit") as raised:
        arena.empty(2 * MiB + 1, np.uint8)
    assert isinstance(raised.value, MemoryError) and isinstance(raised.value, bn.BitNetError)
    assert arena.stats() == before
    assert backend.allocated == [MiB, 1024]  # the 4 MiB carving block did not fit: an exact block did
    assert backend.freed == []
    arena.release(kept)
    arena.release(arena.empty(MiB, np.uint8))
    assert arena.stats().misses == before.misses


def test_the_limit_gives_cached_blocks_back_to_make_room():
    backend = RecordingBlocks()
    arena = bn.Arena(backend=backend)
    arena.release(arena.empty(2 * MiB, np.uint8))
    arena.set_limit(3 * MiB)  # lower than what is held: the free block goes back at once
    assert arena.total_bytes() == 0 and backend.freed == [LARGE_BLOCK]
    arena.release(arena.empty(300 * KiB, np.uint8))
    arena.release(arena.empty(SMALL_LIMIT, np.uint8))
    cached = arena.total_bytes()
    big = arena.empty(3 * MiB - SMALL_LIMIT, np.uint8)  # fits only once the cached blocks are given back
    assert sum(backend.freed) == LARGE_BLOCK + cached
    assert arena.total_bytes() == arena.used_bytes() <= 3 * MiB
    arena.set_limit(None)
    arena.release(big)
    with pytest.raises(bn.InvalidValueError, match=">= 0"):
        arena.set_limit(-1)


class TightBlocks(RecordingBlocks):
    """CPU blocks with a hard capacity, like a device that runs out of memory."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity

    def allocate(self, nbytes):
        if sum(self.allocated) - sum(self.freed) + nbytes > self.capacity:
            raise MemoryError(f"out of device memory for {nbytes} bytes")
        return super().allocate(nbytes)


def test_a_backend_out_of_memory_gets_the_pooled_blocks_back_and_a_retry():
    backend = TightBlocks(capacity=LARGE_BLOCK + MiB)
    arena = bn.Arena(backend=backend)
    arena.release(arena.empty(2 * MiB, np.uint8))
    arena.release(arena.empty(SMALL_LIMIT, np.uint8))
    big = arena.empty(LARGE_BLOCK + LARGE_GRAIN, np.uint8)  # too big for the pooled block
    assert sorted(backend.freed) == [SMALL_LIMIT, LARGE_BLOCK]
    assert arena.total_bytes() == arena.used_bytes() == LARGE_BLOCK + LARGE_GRAIN
    with pytest.raises(bn.ArenaLimitError, match="out of device memory"):  # also a MemoryError
        arena.empty(2 * MiB, np.uint8)
    arena.release(big)


# ---------------------------------------------------------------- threads


def test_two_threads_allocating_and_releasing_never_share_a_block():
    # 2 x 50,000 allocations with a window of live arrays per thread: each thread writes its own
    # pattern and checks it before releasing, so a block handed to both threads shows. Most
    # requests hit the size classes; one in 64 is carved from the big blocks both threads share.
    arena = bn.Arena()
    per_thread = 50_000
    failures = []
    rng = np.random.default_rng(7)
    large = rng.random(per_thread) < 1 / 64
    sizes = np.where(
        large, rng.integers(SMALL_LIMIT + 1, 4 * SMALL_LIMIT, per_thread), rng.integers(1, 2048, per_thread)
    )

    def check_and_release(a, value, tag):
        if not (a == value).all():
            failures.append(f"thread {tag}: a buffer was overwritten by the other thread")
        arena.release(a)

    def run(tag):
        live = []
        for i in range(per_thread):
            value = (tag * 128 + i) % 256
            a = arena.empty(int(sizes[i]), np.uint8)
            a.fill(value)
            live.append((a, value))
            if len(live) == 8:
                check_and_release(*live.pop(i % 8), tag)
        for a, value in live:
            check_and_release(a, value, tag)

    def worker(tag):
        try:
            run(tag)
        except Exception as error:  # an exception in a thread would otherwise go unnoticed
            failures.append(f"thread {tag}: {error!r}")

    threads = [threading.Thread(target=worker, args=(tag,)) for tag in (0, 1)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads every few operations, not every 5 ms
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
    s = arena.stats()
    assert (s.used_bytes, s.live_arrays) == (0, 0)
    assert s.hits + s.misses == 2 * per_thread
    assert s.free_bytes == s.total_bytes


# ---------------------------------------------------------------- allocation-free steady state


def test_a_warm_loop_allocates_no_new_numpy_buffers():
    arena = bn.Arena()
    shapes = [((64, 2560), np.int8), ((64,), np.float32), ((64, 2560), np.float32), ((64, 6912), np.float32)]
    biggest = 64 * 6912 * 4

    def step():
        with arena.frame():
            for shape, dtype in shapes:
                arena.empty(shape, dtype)

    step()
    misses = arena.miss_count()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            step()
        arena_peak = tracemalloc.get_traced_memory()[1] - base

        tracemalloc.reset_peak()  # control: tracemalloc does see numpy's buffers
        base = tracemalloc.get_traced_memory()[0]
        for shape, dtype in shapes:
            np.empty(shape, dtype)
        numpy_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert arena.miss_count() == misses
    assert numpy_peak >= biggest
    assert arena_peak < 64 * KiB


# ---------------------------------------------------------------- misuse and debug mode


def test_release_errors_without_debug_mode():
    arena = bn.Arena(debug=False)
    a = arena.empty(100)
    view = a[10:]
    arena.release(a)
    with pytest.raises(bn.ArenaDoubleReleaseError, match="already released"):
        arena.release(a)
    with pytest.raises(bn.ArenaDoubleReleaseError):
        arena.release(view)  # without debug mode a view reads as a double release
    with pytest.raises(bn.ArenaForeignArrayError, match="not allocated by this arena"):
        arena.release(np.zeros(100, np.float32))
    with pytest.raises(bn.ArenaForeignArrayError):
        bn.Arena().release(arena.empty(100))
    with pytest.raises(bn.ArenaForeignArrayError):
        arena.block_of([1, 2, 3])
    assert a.flags.writeable  # no poisoning, no read-only flag outside debug mode


def test_views_of_released_buffers_see_the_next_owner_without_debug_mode():
    arena = bn.Arena(debug=False)
    stale = arena.empty(100, np.int32)
    view = stale[:10]
    arena.release(stale)
    fresh = arena.empty(100, np.int32)
    fresh.fill(7)
    assert np.shares_memory(view, fresh)
    assert (view == 7).all()


def test_debug_mode_poisons_released_buffers():
    arena = bn.Arena(debug=True)
    assert arena.debug
    floats = arena.empty((3, 5), np.float32)
    codes = arena.empty(64, np.int8)
    floats.fill(1.5)
    codes.fill(1)
    float_view, code_view = floats[1], codes[:8]
    arena.release(floats)
    arena.release(codes)
    with arena.frame():
        scratch = arena.empty(1000, np.float64)
        scratch.fill(0)
    assert np.isnan(float_view).all() and np.isnan(floats).all()
    assert (code_view.view(np.uint8) == POISON_BYTE).all()
    assert np.isnan(scratch).all()
    with pytest.raises(ValueError, match="read-only"):
        floats[0, 0] = 2.0  # a write through the released array itself fails


def test_debug_mode_tells_double_release_from_foreign_arrays():
    arena = bn.Arena(debug=True)
    a = arena.empty(100)
    with pytest.raises(bn.ArenaForeignArrayError, match="view or slice"):
        arena.release(a[1:])
    arena.release(a)
    with pytest.raises(bn.ArenaDoubleReleaseError, match="already released"):
        arena.release(a)
    with arena.frame():
        b = arena.empty(100)
    with pytest.raises(bn.ArenaDoubleReleaseError):
        arena.release(b)
    with pytest.raises(bn.ArenaForeignArrayError, match="not allocated by this arena"):
        arena.release(np.ones(3))


def test_debug_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert bn.Arena().debug
    assert not bn.Arena(debug=False).debug
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert not bn.Arena().debug
    monkeypatch.setenv(DEBUG_ENV, "maybe")
    with pytest.raises(bn.InvalidValueError, match=DEBUG_ENV):
        bn.Arena()


@pytest.mark.parametrize("module", [bitnet.memory.arena, bitnet.memory.backend])
def test_docstring_examples_run(module):
    assert doctest.testmod(module).failed == 0


# ---- odd Python values give library errors, never a builtin one -------------------------------------------


@pytest.mark.parametrize("shape", [None, 1.5, np.float32(2), np.array(3), "abc", object(), True, (2, True),
                                  (2**40, 2**40), 2**70])
def test_empty_refuses_odd_shapes_with_a_shape_error(shape):
    arena = bn.Arena()
    with pytest.raises(bn.ShapeError):
        arena.empty(shape)
    with pytest.raises(bn.ShapeError):
        arena.zeros(shape)
    assert arena.stats().live_arrays == 0 and arena.used_bytes() == 0


@pytest.mark.parametrize("dtype", ["bogus", 1.5, -1, np.zeros(2), [1, 2], object()])
def test_empty_refuses_odd_dtypes_with_a_dtype_error(dtype):
    with pytest.raises(bn.DTypeError):
        bn.Arena().empty(4, dtype)


@pytest.mark.parametrize("limit", ["1", 1.5, np.nan, True, np.zeros(2), [1], -1])
def test_odd_limits_are_invalid_values(limit):
    with pytest.raises(bn.InvalidValueError):
        bn.Arena(limit=limit)
    with pytest.raises(bn.InvalidValueError):
        bn.Arena().set_limit(limit)


@pytest.mark.parametrize("kwargs", [dict(debug="no"), dict(debug=np.zeros(2)), dict(backend=object()),
                                    dict(backend="cpu")])
def test_odd_debug_or_backend_are_invalid_values(kwargs):
    with pytest.raises(bn.InvalidValueError):
        bn.Arena(**kwargs)


def test_release_of_odd_values_is_a_foreign_array_error():
    arena = bn.Arena()
    for bad in (None, 3, [1, 2], np.zeros(3)):
        with pytest.raises(bn.ArenaForeignArrayError):
            arena.release(bad)


def test_more_memory_than_the_system_gives_is_an_arena_error():
    arena = bn.Arena()
    with pytest.raises(bn.ArenaLimitError, match="out of memory"):
        arena.empty((2**50,), np.uint8)  # 1 PiB: numpy's MemoryError, as the library's error
    assert arena.used_bytes() == 0


# --- huge pages (bitnet.memory.huge_pages) -----------------------------------------------------------------------

needs_huge_page_advice = pytest.mark.skipif(
    not huge_pages.AVAILABLE, reason="this OS has no huge-page advice (MADV_HUGEPAGE): buffers are ordinary arrays")


@needs_huge_page_advice
@pytest.mark.parametrize("nbytes", [1, 64, 3 * MiB + 5])
def test_a_huge_page_buffer_starts_on_a_huge_page_and_is_ordinary_memory(nbytes):
    buffer = huge_pages.huge_page_buffer(nbytes)
    assert buffer.dtype == np.uint8 and buffer.shape == (nbytes,) and buffer.flags.writeable
    assert address(buffer) % huge_pages.HUGE_PAGE == 0
    buffer[:] = 7
    assert int(buffer.astype(np.int64).sum()) == 7 * nbytes
    assert huge_pages.on_huge_pages(buffer) and huge_pages.on_huge_pages(buffer[nbytes // 2 :].view())
    assert not huge_pages.on_huge_pages(np.empty(nbytes, np.uint8))


@needs_huge_page_advice
def test_empty_arrays_are_packed_in_order_into_one_huge_page_buffer():
    layouts = [((3, 37), np.dtype(np.uint8)), ((5, 1), np.dtype(np.float32)), ((1,), np.dtype(np.int64)),
               ((2 * MiB + 3,), np.dtype(np.uint8)), ((0, 4), np.dtype(np.float32))]
    arrays = huge_pages.empty_arrays(layouts)
    for (shape, dtype), array in zip(layouts, arrays, strict=True):
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous and array.flags.writeable
        assert address(array) % ALIGNMENT == 0 and huge_pages.on_huge_pages(array)
    assert address(arrays[0]) % huge_pages.HUGE_PAGE == 0
    starts = [address(a) for a in arrays]
    assert starts[:4] == [starts[0], starts[0] + 128, starts[0] + 192, starts[0] + 256]  # 111, 20, 8 bytes rounded
    for i, array in enumerate(arrays):
        array[...] = i
    assert [int(np.unique(a)[0]) for a in arrays[:4]] == [0, 1, 2, 3]  # no overlaps

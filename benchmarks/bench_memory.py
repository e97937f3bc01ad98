"""asv: arena allocation vs np.empty, 4 KiB .. 64 MiB (aim: >= 5x faster for pooled sizes),
one decode step's worth of allocations, and peak memory of 1000 matmul calls with and without
an arena-held ``out``.
"""

import numpy as np

import bitnet as bn

KiB, MiB = 1024, 1024 * 1024
SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB]
PAGE = 4096

# One decode step of a 2560-wide model, roughly: per layer, int8 activations, scales and
# float32 temporaries for attention (2560) and the MLP (6912), 50 times over: 200 allocations.
DECODE_STEP = [((1, 2560), np.int8), ((1,), np.float32), ((1, 2560), np.float32), ((1, 6912), np.float32)] * 50


class Allocate:
    """One empty + release of a pooled size against one np.empty (freed when it goes out of scope)."""

    params = [SIZES]
    param_names = ["nbytes"]

    def setup(self, nbytes):
        self.arena = bn.Arena()
        self.arena.release(self.arena.empty(nbytes, np.uint8))  # the block is pooled before timing

    def time_arena_empty_release(self, nbytes):
        self.arena.release(self.arena.empty(nbytes, np.uint8))

    def time_arena_frame_empty(self, nbytes):
        with self.arena.frame():
            self.arena.empty(nbytes, np.uint8)

    def time_numpy_empty(self, nbytes):
        np.empty(nbytes, np.uint8)


class AllocateAndTouch:
    """Allocate and write one byte per 4 KiB page, as a kernel writing its output does.

    np.empty gets fresh pages from the OS for big sizes (a page fault on each first write);
    pooled arena memory is already mapped.
    """

    params = [SIZES]
    param_names = ["nbytes"]

    def setup(self, nbytes):
        self.arena = bn.Arena()
        self.arena.release(self.arena.empty(nbytes, np.uint8))

    def time_arena_empty_touch(self, nbytes):
        a = self.arena.empty(nbytes, np.uint8)
        a[::PAGE] = 1
        self.arena.release(a)

    def time_numpy_empty_touch(self, nbytes):
        a = np.empty(nbytes, np.uint8)
        a[::PAGE] = 1


class DecodeStep:
    """~200 temporaries of one decode step: in one arena frame vs np.empty each."""

    def setup(self):
        self.arena = bn.Arena()
        self.time_arena_frame()  # warm: every size class has its blocks

    def time_arena_frame(self):
        with self.arena.frame():
            for shape, dtype in DECODE_STEP:
                self.arena.empty(shape, dtype)

    def time_numpy_empty(self):
        for shape, dtype in DECODE_STEP:
            np.empty(shape, dtype)

    def track_arena_misses_per_step(self):
        misses = self.arena.miss_count()
        self.time_arena_frame()
        return self.arena.miss_count() - misses

    track_arena_misses_per_step.unit = "new blocks"


class MatmulLoop:
    """Peak memory of 1000 ``bn.matmul`` calls on a 2560x2560 i2 weight, ``out`` from an arena or not."""

    timeout = 600
    params = [[1, 8]]
    param_names = ["rows"]

    def setup(self, rows):
        rng = np.random.default_rng(0)
        self.w = bn.pack(bn.quantize_weights(rng.standard_normal((2560, 2560)).astype(np.float32)), "i2")
        self.x = rng.standard_normal((rows, 2560)).astype(np.float32)
        self.arena = bn.Arena()
        self.out = self.arena.empty((rows, 2560), np.float32)
        bn.matmul(self.x, self.w, out=self.out)  # compile and fill the weight's cache outside the measurement

    def teardown(self, rows):
        self.arena.release(self.out)

    def peakmem_matmul_1000_arena_out(self, rows):
        for _ in range(1000):
            bn.matmul(self.x, self.w, out=self.out)

    def peakmem_matmul_1000_no_arena(self, rows):
        for _ in range(1000):
            bn.matmul(self.x, self.w)

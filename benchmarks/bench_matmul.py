"""asv: bn.matmul on the CPU kernels, next to numpy float32 on the same shapes.

Targets (issue 3, 2 threads on a 2-core AVX-512 VNNI machine, activation quantization
included): n=1 2560x2560 <= 29 us, 6912x2560 <= 87 us, 2560x6912 <= 85 us; n=8 2560x2560
<= 110 us; n=128 2560x6912 <= 9.6 ms; 519 MB of weights streamed in <= 26 ms. Results and
what was tried: benchmarks/NOTES.md.
"""

import numpy as np

import bitnet as bn
from bitnet import bench
from bitnet.kernels import cpu_features

THREADS = 2
SHAPES = [f"{m}x{k}x{n}" for m, k, n in bench.SHAPES]


def _parse(shape: str) -> tuple[int, int, int]:
    m, k, n = (int(v) for v in shape.split("x"))
    return m, k, n


class _Threads:
    """Run every benchmark at THREADS threads (or fewer on a smaller machine)."""

    def setup_threads(self):
        import numba

        self._before = bn.get_num_threads()
        bn.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))

    def teardown(self, *args):
        bn.set_num_threads(self._before)


class Matmul(_Threads):
    """``bn.matmul`` (quantization included) per shape (m x k x n tokens) and kernel path."""

    params = [SHAPES, list(cpu_features.supported_paths())]
    param_names = ["shape", "path"]

    def setup(self, shape, path):
        self.setup_threads()
        m, k, n = _parse(shape)
        self.w = bench.random_i2_weights(m, k)
        self.x = np.random.default_rng(1).standard_normal((n, k) if n > 1 else k).astype(np.float32)
        self.out = np.empty(self.x.shape[:-1] + (m,), np.float32)
        bn.matmul(self.x, self.w, out=self.out, path=path)  # compile outside the timing

    def time_matmul(self, shape, path):
        bn.matmul(self.x, self.w, out=self.out, path=path)


class NumpyFloat32(_Threads):
    """The baseline: numpy float32 ``x @ w.T`` on the same shapes."""

    params = [SHAPES]
    param_names = ["shape"]

    def setup(self, shape):
        self.setup_threads()
        m, k, n = _parse(shape)
        rng = np.random.default_rng(2)
        self.w = rng.standard_normal((m, k)).astype(np.float32)
        self.x = rng.standard_normal((n, k) if n > 1 else k).astype(np.float32)

    def time_numpy_float32(self, shape):
        self.x @ self.w.T


class StreamFromDram(_Threads):
    """519 MB of i2 weights (16384 x 126720), far beyond the caches: DRAM-bandwidth bound."""

    timeout = 240
    repeat = (3, 10, 60.0)

    def setup(self):
        self.setup_threads()
        m, k, _ = bench.STREAM_SHAPE
        self.w = bench.random_i2_weights(m, k)
        self.x = np.random.default_rng(1).standard_normal(k).astype(np.float32)
        self.out = np.empty(m, np.float32)
        bn.matmul(self.x, self.w, out=self.out)

    def time_stream_519mb(self):
        bn.matmul(self.x, self.w, out=self.out)


def timeraw_cold_jit():
    """Import bitnet and run one small matmul in a fresh interpreter with an empty Numba cache."""
    return """
import os, tempfile
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp()
import numpy as np
import bitnet as bn
t = bn.quantize_weights(np.ones((8, 300), np.float32))
bn.matmul(np.ones(300, np.float32), bn.pack(t, "i2"))
bn.matmul(np.ones((9, 300), np.float32), bn.pack(t, "i2"))
"""


timeraw_cold_jit.timeout = 300

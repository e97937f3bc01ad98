"""asv: the attention kernel alone (``bn.kernels.attention``), 2B4T heads (20 query heads over 5 key/value
heads, head_dim 128), float16 cache.

Prefill: 64 and 256 queries from position 0 (the causal triangle, as a prompt's first chunk).
Decode: one query over 2048 cached positions in each of 30 caches, one per layer, so every call
reads its keys and values from DRAM as a decode step of the full model does (157 MB).
"""

import numpy as np

from bitnet.kernels import attention
from bitnet.ops import KERNEL_PATH

from .bench_matmul import _Threads

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 20, 5, 128, 30


def _cache(positions, rng):
    """Random float16 keys or values for ``positions`` positions, as the kernels take them (uint16 words)."""
    return rng.standard_normal((KV_HEADS, positions, HEAD_DIM)).astype(np.float16).view(np.uint16)


class Attention(_Threads):
    """``causal_attention`` of ``queries`` queries from ``start`` (prefill), or of one query per layer (decode)."""

    params = [["prefill 64", "prefill 256", "decode 2048 x 30 layers"]]
    param_names = ["case"]

    def setup(self, case):
        self.setup_threads()
        rng = np.random.default_rng(0)
        words = case.split()
        if words[0] == "prefill":
            n = int(words[1])
            start, capacity, layers = 0, n, 1
        else:
            n, start, capacity, layers = 1, int(words[1]) - 1, int(words[1]), LAYERS
        self.queries = rng.standard_normal((n, HEADS, HEAD_DIM)).astype(np.float32)
        self.caches = [(_cache(capacity, rng), _cache(capacity, rng)) for _ in range(layers)]
        shapes = attention.scratch_shapes(n, HEADS, KV_HEADS, HEAD_DIM, capacity)
        self.work = [np.empty(shape, np.float32) for shape in shapes.values()]
        self.out = np.empty((n, HEADS * HEAD_DIM), np.float32)
        self.start, self.chunk = start, attention.chunk_length(n, capacity)
        self.kernel = attention.for_attention(n, start + n, KERNEL_PATH)
        self.time_attention(case)  # compile outside the timing

    def time_attention(self, case):
        for keys, values in self.caches:
            self.kernel(self.queries, keys, values, self.start, np.float32(HEAD_DIM**-0.5), self.chunk, *self.work,
                        self.out)

"""asv: the attention kernel alone (``bn.kernels.attention``), 2B4T heads (20 query heads over 5 key/value
heads, head_dim 128), float16 cache.

Prefill: 64 and 256 queries from position 0 (the causal triangle, as a prompt's first chunk).
Decode: one query over 2048 cached positions in each of 30 caches, one per layer, so every call
reads its keys and values from DRAM as a decode step of the full model does (157 MB). Batched
decode: 8 sequences of 64 cached positions each, one call per layer over all 8 (a server's step).
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

    params = [["prefill 64", "prefill 256", "decode 2048 x 30 layers", "decode 8 x 64 x 30 layers"]]
    param_names = ["case"]

    def setup(self, case):
        self.setup_threads()
        rng = np.random.default_rng(0)
        words = case.split()
        if words[0] == "prefill":
            n = int(words[1])
            sequences, start, capacity, layers = 1, 0, n, 1
        else:
            sequences = int(words[1]) if len(words) == 7 else 1
            n, start, capacity, layers = sequences, int(words[-4]) - 1, int(words[-4]), LAYERS
        self.queries = rng.standard_normal((n, HEADS, HEAD_DIM)).astype(np.float32)
        self.caches = [[(_cache(capacity, rng), _cache(capacity, rng)) for _ in range(sequences)]
                       for _ in range(layers)]
        spans = [(0, start, n)] if sequences == 1 else [(s, start, 1) for s in range(sequences)]
        self.rows = attention.query_rows(spans, capacity)
        self.tables = [np.stack([attention.address_table([k], [v]) for k, v in layer]) for layer in self.caches]
        self.template = attention.cache_template(KV_HEADS, HEAD_DIM, np.float16)
        shapes = attention.scratch_shapes(n, int(self.rows[:, attention.CHUNK].min()), HEADS, KV_HEADS, HEAD_DIM,
                                          capacity)
        self.work = [np.empty(shape, np.float32) for shape in shapes.values()]
        self.out = np.empty((n, HEADS * HEAD_DIM), np.float32)
        self.kernel = attention.ENTRY_POINTS[KERNEL_PATH, attention.threaded_attention(n, start + n)]
        self.time_attention(case)  # compile outside the timing

    def time_attention(self, case):
        for tables in self.tables:
            self.kernel(self.queries, self.rows, tables, 0, self.template, np.float32(HEAD_DIM**-0.5),
                        *self.work, self.out)

"""asv: one decode step (a token through the cached model) at 0 and 2048 cached positions, float16 or float32 KV.

The model is 4 layers of BitNet b1.58 2B4T width (hidden 2560, intermediate 6912, heads
20/5, head_dim 128) with an int8 head of 32768 rows, random weights: a step streams 70 MB
of ternary weights and an 84 MB head, so the layers are not drowned by the full 128256-row
head (329 MB) and setup (building the model, filling 2048 positions) stays within ~20 s on
2 cores. At 2048 positions a step also reads 42 MB of cached keys and values, and attention's
share of a step shows (22 vs 31 ms here). The full model: ``python -m bitnet bench-model --context``.
"""

import numpy as np

import bitnet as bn
from bitnet.models.bench import filled_cache

from .bench_matmul import _Threads

CONFIG = bn.BitNetConfig(vocab_size=32768, num_hidden_layers=4)


class DecodeStep(_Threads):
    """``model.forward`` of one token after ``positions`` cached positions, the cache rewound before each step."""

    params = [[0, 2048], ["float16", "float32"]]
    param_names = ["positions", "kv_dtype"]
    timeout = 180

    def setup(self, positions, kv_dtype):
        self.setup_threads()
        self.model = bn.models.random_model(CONFIG, head_dtype="int8")
        self.model.kv_dtype = kv_dtype
        self.positions = positions
        self.cache, _ = filled_cache(self.model, positions, 1, np.random.default_rng(0))
        self.token = np.array([1])
        self.logits = np.empty((1, CONFIG.vocab_size), np.float32)
        self.time_decode_step(positions, kv_dtype)  # compile and touch the weights outside the timing

    def time_decode_step(self, positions, kv_dtype):
        self.cache.length = self.positions  # the step overwrites the position the last one wrote
        self.model.forward(self.token, self.cache, out=self.logits)

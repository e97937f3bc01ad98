"""asv: the output head of a BitNet b1.58 2B4T-shaped model (128256 x 2560), per storage kind.

The head is read once per generated token and is the largest single item of a decode step
(314 MiB as int8, 626 MiB as bf16 or f16, 1.2 GiB as f32), so its time is bound by DRAM
bandwidth when the kernel keeps up. Results and what was tried: benchmarks/NOTES.md ("Model").
"""

import numpy as np

from bitnet.nn import Embedding

from .bench_matmul import _Threads

VOCAB, HIDDEN = 128256, 2560


class HeadLogits(_Threads):
    """``Embedding.logits`` for one token (a decode step) and for 8."""

    params = [["int8", "bf16", "f16", "f32"], [1, 8]]
    param_names = ["dtype", "tokens"]
    timeout = 300

    def setup(self, dtype, tokens):
        self.setup_threads()
        rng = np.random.default_rng(0)
        if dtype == "int8":
            table = rng.integers(-127, 128, (VOCAB, HIDDEN), dtype=np.int8)
            self.head = Embedding(table, "int8", rng.uniform(0.001, 0.01, VOCAB).astype(np.float32))
        else:  # random 16-bit words with exponents near 1.0 (no NaN/Inf) as bf16 or as f16
            words = (rng.integers(0, 2**14, (VOCAB, HIDDEN), dtype=np.uint16) | 0x3C00).astype(np.uint16)
            if dtype == "bf16":
                self.head = Embedding(words, "bf16")
            else:
                f16 = words.view(np.float16)
                self.head = Embedding(f16 if dtype == "f16" else f16.astype(np.float32), dtype)
        self.h = rng.standard_normal((tokens, HIDDEN)).astype(np.float32)
        self.out = np.empty((tokens, VOCAB), np.float32)
        self.head.logits(self.h, out=self.out)  # compile outside the timing

    def time_logits(self, dtype, tokens):
        self.head.logits(self.h, out=self.out)



class EmbeddingRows:
    """``Embedding.rows`` (a serial copy): the lookup of one decode step and of a 512-token prompt.

    32768 table rows rather than 128256: a lookup touches only its rows, and building the
    full table in every setup would take longer than the benchmark.
    """

    params = [["int8", "bf16", "f16", "f32"], [1, 512]]
    param_names = ["dtype", "tokens"]

    def setup(self, dtype, tokens):
        rng = np.random.default_rng(0)
        self.table = Embedding.from_weights(rng.standard_normal((32768, HIDDEN), np.float32), dtype)
        self.ids = rng.integers(0, 32768, tokens)
        self.out = np.empty((tokens, HIDDEN), np.float32)
        self.table.rows(self.ids, out=self.out)  # compile outside the timing

    def time_rows(self, dtype, tokens):
        self.table.rows(self.ids, out=self.out)

def timeraw_cold_jit_heads():
    """Compile the head kernels (and the block quantizer) in a fresh interpreter with an empty Numba cache."""
    return """
import os, tempfile
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp()
import numpy as np
from bitnet.nn import Embedding
w = np.ones((64, 72), np.float32)
for dtype in ("int8", "bf16", "f16"):
    Embedding.from_weights(w, dtype).logits(np.ones((1, 72), np.float32))
"""


timeraw_cold_jit_heads.timeout = 300

"""asv: the output head of a BitNet b1.58 2B4T-shaped model (128256 x 2560), per storage kind.

The head is read once per generated token and is the largest single item of a decode step
(314 MiB as int8, 626 MiB as bf16), so its time is bound by DRAM bandwidth when the kernel
keeps up. Results and what was tried: benchmarks/NOTES.md ("Model").
"""

import numpy as np

from bitnet.nn import Embedding

from .bench_matmul import _Threads

VOCAB, HIDDEN = 128256, 2560


class HeadLogits(_Threads):
    """``Embedding.logits`` for one token (a decode step) and for 8."""

    params = [["int8", "bf16"], [1, 8]]
    param_names = ["dtype", "tokens"]
    timeout = 300

    def setup(self, dtype, tokens):
        self.setup_threads()
        rng = np.random.default_rng(0)
        if dtype == "int8":
            table = rng.integers(-127, 128, (VOCAB, HIDDEN), dtype=np.int8)
            self.head = Embedding(table, "int8", rng.uniform(0.001, 0.01, VOCAB).astype(np.float32))
        else:  # random bf16 words with exponents near 1.0 (no NaN/Inf)
            words = (rng.integers(0, 2**14, (VOCAB, HIDDEN), dtype=np.uint16) | 0x3C00).astype(np.uint16)
            self.head = Embedding(words, "bf16")
        self.h = rng.standard_normal((tokens, HIDDEN)).astype(np.float32)
        self.out = np.empty((tokens, VOCAB), np.float32)
        self.head.logits(self.h, out=self.out)  # compile outside the timing

    def time_logits(self, dtype, tokens):
        self.head.logits(self.h, out=self.out)


def timeraw_cold_jit_heads():
    """Compile both head kernels (and the block quantizer) in a fresh interpreter with an empty Numba cache."""
    return """
import os, tempfile
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp()
import numpy as np
from bitnet.nn import Embedding
w = np.ones((64, 72), np.float32)
for dtype in ("int8", "bf16"):
    Embedding.from_weights(w, dtype).logits(np.ones((1, 72), np.float32))
"""


timeraw_cold_jit_heads.timeout = 300

"""The names a user picks among (table and cache storage, file formats) and the server's default sizes.

Plain values in a module that imports nothing, so that the command line offers them in its
``--help`` without loading numba and the kernels; the modules that act on them take them
from here.
"""

HEAD_DTYPES = ("f32", "f16", "bf16", "int8")
"""Storage of an embedding/head table (``bitnet.nn.Embedding``)."""

HEADS = ("auto", *HEAD_DTYPES)
"""A loader's or converter's head storage: one of ``HEAD_DTYPES``, or "auto" (as in the checkpoint)."""

CACHE_DTYPES = ("float32", "float16")
"""Storage of a KV cache (``bitnet.nn.KVCache``)."""

GGUF_WEIGHT_FORMATS = ("tq2_0", "tq1_0", "i2_s")
"""Ternary tensor types ``bitnet.save_gguf`` writes: llama.cpp's TQ2_0 and TQ1_0, bitnet.cpp's I2_S."""

CONVERT_FORMATS = ("hf", *GGUF_WEIGHT_FORMATS)
"""What ``bitnet.io.convert_checkpoint`` writes: an HF packed directory, or a GGUF file of one of those types."""

DEFAULT_MAX_BATCH = 8  # requests a server generates for at once
DEFAULT_PREFILL_CHUNK = 64  # prompt tokens a server step reads, over all requests
DEFAULT_MAX_QUEUE = 64  # requests a server keeps waiting for a slot

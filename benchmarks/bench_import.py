"""asv: what a user waits for before the first result: ``import bitnet`` and the kernels' first compile.

Each ``timeraw_*`` sample runs in a fresh interpreter. The compile benchmarks point Numba's
on-disk cache (``NUMBA_CACHE_DIR``) at an empty temporary folder in their setup, so what the
statement times is a first call in a fresh environment: type inference, LLVM and machine code
for every specialization the call meets (a warm cache only loads them).
"""

from bitnet.kernels import cpu_features

# Run before numba is imported (numba reads NUMBA_CACHE_DIR once, at import); the folder is
# removed when the sample's interpreter exits.
COLD_CACHE = """
import atexit, os, shutil, tempfile
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="bitnet-cold-cache-")
atexit.register(shutil.rmtree, os.environ["NUMBA_CACHE_DIR"], True)
import numpy as np
import bitnet as bn
rng = np.random.default_rng(0)
"""

# A first compile takes tens of seconds on a small machine, so two samples or so (within a
# minute) and no warm-up call: a warm-up would be one more whole cold compile, thrown away.
COMPILE_REPEAT = (1, 3, 60.0)
COMPILE_TIMEOUT = 600


def timeraw_import_bitnet():
    """``import bitnet`` alone (numpy and the error classes; everything else loads on first use)."""
    return "import bitnet"


def timeraw_import_bitnet_and_kernels():
    """``import bitnet`` and the first name that needs the kernels: numba and every kernel module."""
    return "import bitnet as bn; bn.matmul"


def timeraw_compile_quantize():
    """First ``quantize_weights`` (absmean, per tensor and per channel) and ``quantize_activations``."""
    stmt = """
bn.quantize_weights(w)
bn.quantize_weights(w, granularity="channel")
bn.quantize_activations(x)
"""
    setup = COLD_CACHE + """
w = rng.standard_normal((256, 512)).astype(np.float32)
x = rng.standard_normal((4, 512)).astype(np.float32)
"""
    return stmt, setup


def timeraw_compile_pack():
    """First ``pack`` into every format, and ``unpack`` back (each format's own encoder and decoder)."""
    stmt = """
for fmt in bn.FORMATS:
    bn.unpack(bn.pack(t, fmt))
"""
    setup = COLD_CACHE + """
t = bn.quantize_weights(rng.standard_normal((256, 512)).astype(np.float32))
"""
    return stmt, setup


def timeraw_compile_matmul(path):
    """First ``bn.matmul`` on one kernel path: decode (1 token), a small batch (3) and prefill (32 tokens).

    32 tokens also reaches the AMX tiles on the ``amx`` path. Weights are quantized and packed
    in the setup, so only the matmul's own kernels compile in the statement.
    """
    stmt = f"""
for n in (1, 3, 32):
    bn.matmul(rng.standard_normal((n, 512)).astype(np.float32), p, path={path!r})
"""
    setup = COLD_CACHE + """
p = bn.pack(bn.quantize_weights(rng.standard_normal((256, 512)).astype(np.float32)), "i2")
"""
    return stmt, setup


def timeraw_compile_model_forward(head):
    """A small random BitNet model's first prefill (5 tokens) and decode step, embedding/head stored as ``head``.

    Compiles the layers' kernels (norms, rope, attention, the gated MLP, the head) and the
    matmuls on this CPU's default path. The model is built in the setup.
    """
    stmt = """
cache = model.new_cache()
model.forward(np.arange(5), cache)
model.forward(np.array([5]), cache, last_only=True)
"""
    setup = COLD_CACHE + f"""
config = bn.BitNetConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
model = bn.models.random_model(config, head_dtype={head!r})
"""
    return stmt, setup


for _benchmark in (timeraw_compile_quantize, timeraw_compile_pack, timeraw_compile_matmul,
                   timeraw_compile_model_forward):
    _benchmark.repeat = COMPILE_REPEAT
    _benchmark.warmup_time = 0
    _benchmark.timeout = COMPILE_TIMEOUT

timeraw_compile_matmul.params = [list(cpu_features.supported_paths())]
timeraw_compile_matmul.param_names = ["path"]
timeraw_compile_model_forward.params = [["bf16", "int8"]]
timeraw_compile_model_forward.param_names = ["head"]

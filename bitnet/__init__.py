"""bitnet: BitNet b1.58 ternary networks in Python, with Numba kernels.

``import bitnet as bn`` gives the whole user API. Only the error classes load with the
package: every other name imports its module on first use (``bn.matmul`` loads numba and the
kernels, ``bn.load_pretrained`` the I/O, ``bn.cuda`` the CUDA backend), so ``import bitnet``
stays quick and code that only names a class or catches ``bn.BitNetError`` never loads numba.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_names
from .errors import (
    ArenaDoubleReleaseError,
    ArenaError,
    ArenaForeignArrayError,
    ArenaLimitError,
    BitNetError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    DeviceError,
    DTypeError,
    FormatError,
    GGUFError,
    InvalidValueError,
    OutOfMemoryError,
    ShapeError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:  # the lazy names spelled out for type checkers, IDEs and the API docs; never run
    from . import cuda, io, metrics, models, nn
    from .backends import devices
    from .formats import FORMATS, PackedTernary, convert, pack, unpack
    from .io import load_gguf, load_gguf_tokenizer, load_pretrained, load_tokenizer, save_gguf, save_pretrained
    from .memory import Arena, default_arena
    from .models import BitNetConfig, BitNetForCausalLM
    from .ops import get_num_threads, matmul, matmul_int, release_worker_threads, set_num_threads
    from .quant import QuantizedTensor, TernaryTensor, quantize_activations, quantize_weights

# The module (relative to this package) each lazily loaded name comes from, as imported
# under TYPE_CHECKING above (tests/test_import.py holds the two equal). None of these
# names may also be a submodule of this package: importing that submodule would rebind the
# package attribute to the module, shadowing the function.
_HOMES = {
    "devices": "backends",
    "FORMATS": "formats", "PackedTernary": "formats", "convert": "formats", "pack": "formats", "unpack": "formats",
    "load_gguf": "io", "load_gguf_tokenizer": "io", "load_pretrained": "io", "load_tokenizer": "io",
    "save_gguf": "io", "save_pretrained": "io",
    "Arena": "memory", "default_arena": "memory",
    "BitNetConfig": "models", "BitNetForCausalLM": "models",
    "get_num_threads": "ops", "matmul": "ops", "matmul_int": "ops", "release_worker_threads": "ops",
    "set_num_threads": "ops",
    "QuantizedTensor": "quant", "TernaryTensor": "quant", "quantize_activations": "quant", "quantize_weights": "quant",
}

# Subpackages and modules reachable as ``bn.<name>`` without importing them first (metal, torch,
# serve and distributed too: none loads its optional dependencies until one of its names is used).
_SUBMODULES = frozenset({
    "backends", "cuda", "distributed", "formats", "io", "kernels", "memory", "metal", "metrics", "models", "nn",
    "ops", "quant", "serve", "torch",
})

__all__ = [
    "BitNetConfig",
    "BitNetForCausalLM",
    "load_gguf",
    "load_gguf_tokenizer",
    "load_pretrained",
    "load_tokenizer",
    "save_gguf",
    "save_pretrained",
    "io",
    "models",
    "nn",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "GGUFError",
    "FORMATS",
    "Arena",
    "ArenaDoubleReleaseError",
    "ArenaError",
    "ArenaForeignArrayError",
    "ArenaLimitError",
    "BitNetError",
    "DTypeError",
    "DeviceError",
    "FormatError",
    "InvalidValueError",
    "OutOfMemoryError",
    "PackedTernary",
    "QuantizedTensor",
    "ShapeError",
    "TernaryTensor",
    "convert",
    "cuda",
    "default_arena",
    "devices",
    "get_num_threads",
    "matmul",
    "matmul_int",
    "metrics",
    "pack",
    "quantize_activations",
    "quantize_weights",
    "release_worker_threads",
    "set_num_threads",
    "unpack",
]


__getattr__, __dir__ = lazy_names(__name__, _HOMES, _SUBMODULES)

"""bitnet: BitNet b1.58 ternary networks in Python, with Numba kernels.

``import bitnet as bn`` gives the whole user API.
"""

from . import cuda, io, metrics, models, nn  # cuda imports numba.cuda only when it runs
from .backends import devices
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
    ShapeError,
)
from .formats import FORMATS, PackedTernary, convert, pack, unpack
from .io import load_gguf, load_gguf_tokenizer, load_pretrained, load_tokenizer, save_gguf, save_pretrained
from .memory import Arena, default_arena
from .models import BitNetConfig, BitNetForCausalLM
from .ops import get_num_threads, matmul, matmul_int, set_num_threads
from .quant import QuantizedTensor, TernaryTensor, quantize_activations, quantize_weights

__version__ = "0.1.0"

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
    "set_num_threads",
    "unpack",
]

"""bitnet: BitNet b1.58 ternary networks in Python, with Numba kernels.

``import bitnet as bn`` gives the whole user API.
"""

from . import metrics
from .backends import devices
from .errors import (
    ArenaDoubleReleaseError,
    ArenaError,
    ArenaForeignArrayError,
    ArenaLimitError,
    BitNetError,
    DeviceError,
    DTypeError,
    FormatError,
    InvalidValueError,
    ShapeError,
)
from .formats import FORMATS, PackedTernary, convert, pack, unpack
from .memory import Arena, default_arena
from .ops import matmul, matmul_int
from .quant import QuantizedTensor, TernaryTensor, quantize_activations, quantize_weights

__version__ = "0.1.0"

__all__ = [
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
    "default_arena",
    "devices",
    "matmul",
    "matmul_int",
    "metrics",
    "pack",
    "quantize_activations",
    "quantize_weights",
    "unpack",
]

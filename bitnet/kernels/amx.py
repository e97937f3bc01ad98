"""Intel AMX tiles for the ternary GEMM: eight 1 KB tile registers and ``tdpbusd``.

``tdpbusd`` multiplies a 16 x 64 tile of unsigned bytes (16 weight rows, 64 stored codes
each) by a 16 x 64 tile of signed bytes holding 16 tokens' activations in "VNNI layout"
(row ``k4`` holds, for each token, the 4 activations ``4 k4 .. 4 k4 + 3``), accumulating
a 16 x 16 int32 tile: 16384 byte multiply-adds in one instruction, ~4x what ``vpdpbusd``
gives a core. Everything here is exact integer arithmetic.

Linux hands the tile registers to a process only after it asks (``arch_prctl``);
``request_permission`` does that once, and ``bitnet.kernels.cpu_features`` offers the
``amx`` path only when the CPU has the features and the OS said yes: executing a tile
instruction without permission kills the process.

The intrinsics take tile numbers as compile-time literals (``tile_dot(0, 4, 6)``), as the
instructions encode them.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .simd import _call, _element_pointer

TILE_ROWS = 16  # rows of every tile
TILE_BYTES = 64  # bytes per tile row: 64 codes, or 16 tokens x 4 activations, or 16 int32
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86-64


def request_permission() -> bool:
    """Ask Linux for the AMX tile registers for this process; True if granted (False off Linux/x86-64)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def tile_config() -> np.ndarray:
    """The 64-byte ``ldtilecfg`` block: palette 1, all eight tiles 16 rows x 64 bytes."""
    config = np.zeros(64, np.uint8)
    config[0] = 1
    config[16:32].view(np.uint16)[:] = TILE_BYTES
    config[48:56] = TILE_ROWS
    return config


TILE_CONFIG = tile_config()

_I8 = ir.IntType(8)
_VOID = ir.VoidType()


def _literals(*tiles) -> bool:
    return all(isinstance(t, types.IntegerLiteral) for t in tiles)


@intrinsic
def load_config(typingctx, config):
    """``ldtilecfg``: shape the calling thread's tiles as ``config`` (a 64-byte uint8 array) says."""

    def codegen(context, builder, sig, args):
        zero = context.get_constant(types.intp, 0)
        address = _element_pointer(context, builder, sig.args[0], args[0], types.intp, zero, _I8)
        _call(builder, "llvm.x86.ldtilecfg", _VOID, [address])
        return context.get_dummy_value()

    return types.none(config), codegen


@intrinsic
def release_tiles(typingctx):
    """``tilerelease``: give the calling thread's tile state back."""

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilerelease", _VOID, [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def tile_zero(typingctx, tile):
    """Set a tile to zeros."""
    if not _literals(tile):
        return None

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilezero", _VOID, [ir.Constant(_I8, tile.literal_value)])
        return context.get_dummy_value()

    return types.none(tile), codegen


def _tile_transfer(llvm_name: str, doc: str):
    """An intrinsic ``(tile, array, index, stride)`` moving a tile's 16 rows to or from memory.

    The rows start at flat element ``index`` of ``array`` and lie ``stride`` bytes apart.
    """

    @intrinsic
    def transfer(typingctx, tile, array, index, stride):
        if not _literals(tile):
            return None

        def codegen(context, builder, sig, args):
            address = _element_pointer(context, builder, sig.args[1], args[1], sig.args[2], args[2], _I8)
            step = context.cast(builder, args[3], sig.args[3], types.int64)
            _call(builder, llvm_name, _VOID, [ir.Constant(_I8, tile.literal_value), address, step])
            return context.get_dummy_value()

        return types.none(tile, array, index, stride), codegen

    transfer.__doc__ = doc
    return transfer


tile_load = _tile_transfer("llvm.x86.tileloadd64", "Load a tile from memory (``tileloadd``).")
tile_store = _tile_transfer("llvm.x86.tilestored64", "Store a tile to memory (``tilestored``).")


@intrinsic
def tile_dot(typingctx, acc, codes, activations):
    """``tdpbusd``: ``acc[i, j] += sum_k codes[i, k] (u8) * activations[k // 4, 4 j + k % 4] (s8)``."""
    if not _literals(acc, codes, activations):
        return None

    def codegen(context, builder, sig, args):
        tiles = [ir.Constant(_I8, t.literal_value) for t in (acc, codes, activations)]
        _call(builder, "llvm.x86.tdpbusd", _VOID, tiles)
        return context.get_dummy_value()

    return types.none(acc, codes, activations), codegen


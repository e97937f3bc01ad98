"""Float32 math that LLVM can vectorize, where Numba's own does not.

Without Intel's SVML, a loop calling ``np.exp`` runs one scalar ``expf`` per element. Softmax
evaluates it once per score, which made decode attention at 2048 positions compute bound
(NOTES.md). :func:`exp32` is branch-free float and integer arithmetic, so a loop over it
becomes vector code. A max over a loop (``max(a, b)`` or a compare and select) stays scalar
too, as LLVM keeps its NaN rules; :func:`max32` is LLVM's ``maxnum``, which it reduces with
vector instructions.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import float32_from_bits

_LOG2E = np.float32(1.44269504088896341)
_LN2_HIGH = np.float32(0.693359375)  # ln 2 split in two (Cody and Waite): n * _LN2_HIGH is exact
_LN2_LOW = np.float32(-2.12194440e-4)
# Cephes' expf polynomial for e^r - 1 - r on |r| <= ln(2) / 2, relative error about 1 ulp.
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


@njit(cache=True, inline="always")
def _power_of_two(k):
    """``2.0**k`` as a float32 for an int32 ``k`` in [-126, 127]."""
    return float32_from_bits(np.uint32((k + 127) << 23))


_OVERFLOW = np.float32(88.72283)  # above: e**x is past float32's largest value
_UNDERFLOW = np.float32(-87.33654)  # below: e**x is under float32's smallest normal


@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def exp32(x):
    """``e**x`` for a float32 ``x``, within 1 ulp of the exact value where that is a normal float32.

    Results under float32's smallest normal (``x < -87.34``) are 0, ``x > 88.72`` gives Inf and
    NaN stays NaN. Every branch is a select, so a loop over it vectorizes. Compiled on its own
    with only "contract": LLVM inlines it into a caller's loop keeping these flags, so a
    caller's "reassoc" cannot fold the two halves of ln 2 back into one rounded constant.
    """
    n = np.floor(x * _LOG2E + np.float32(0.5))  # e**x = 2**n * e**r with |r| <= ln(2) / 2
    n = min(max(n, np.float32(-126.0)), np.float32(128.0))
    r = x - n * _LN2_HIGH - n * _LN2_LOW
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    # 2**n as two factors built in the exponent field, each a normal float32 for any n in [-126, 128]
    k = np.int32(n)
    half = k >> 1
    y = (p * (r * r) + r + np.float32(1.0)) * _power_of_two(half) * _power_of_two(k - half)
    y = np.float32(np.inf) if x > _OVERFLOW else y
    y = np.float32(0.0) if x < _UNDERFLOW else y
    return x if x != x else y


@intrinsic
def max32(typingctx, a, b):
    """The larger of float32 ``a`` and ``b`` (LLVM ``maxnum``: a NaN operand gives the other one)."""
    if a != types.float32 or b != types.float32:
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.FloatType()])
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.maxnum.f32"), args)

    return types.float32(a, b), codegen

"""Packing formats: ``pack`` a TernaryTensor into bytes, ``unpack`` it back, ``convert`` between formats.

Each format lives in its own module and declares itself once with a :class:`Format`
record (layout, scales it can hold, codec); ``FORMATS`` maps names to those records.
"""

from __future__ import annotations

import numpy as np

from .. import errors
from ..quant import QuantizedTensor, TernaryTensor
from . import base3, ggml_tq, hf, i2, i2_s, i2x16  # noqa: F401  (each module registers its format)
from .base import FORMATS, Format, PackedTernary, check_holds, checked_shape, get_format


def pack(t: TernaryTensor, format: str = "i2") -> PackedTernary:
    """Pack ternary weights into ``format``.

    Parameters
    ----------
    t : TernaryTensor of shape ``(out_features, in_features)``.
    format : "i2" (default, the kernels' layout), "i2x16" (the AVX-512 VNNI kernels' layout),
        "hf", "tq2_0", "tq1_0", "i2_s" or "base3".

    Returns
    -------
    PackedTernary holding the payload, the true shape (formats pad to whole blocks) and
    the float32 scale.

    Raises
    ------
    FormatError for an unknown format, or one that cannot hold ``t``'s scale granularity
    (e.g. per-channel scales into "i2_s"); ShapeError for a tensor that is not 2-D or is
    empty; DTypeError when ``t`` is not ternary.

    Examples
    --------
    >>> import numpy as np, bitnet as bn
    >>> p = bn.pack(bn.quantize_weights(np.ones((4, 256), np.float32)), "tq2_0")
    >>> p.data.shape, p.bits_per_weight
    ((4, 66), 2.0625)
    """
    if not isinstance(t, TernaryTensor):
        kind = f"{t.bits:g}-bit codes" if isinstance(t, QuantizedTensor) else type(t).__name__
        raise errors.DTypeError(f"pack needs a TernaryTensor (from bn.quantize_weights), got {kind}")
    fmt = get_format(format)
    errors.check_ndim(t.codes, "packed weights", (2,))
    shape = checked_shape(t.shape)
    check_holds(fmt, t.granularity, t.group_size)
    data = fmt.encode(np.ascontiguousarray(t.codes), t.scale, t.granularity)
    return PackedTernary(format, shape, data, t.scale, t.granularity, t.group_size)


def unpack(p: PackedTernary) -> TernaryTensor:
    """The TernaryTensor packed in ``p``: exactly the codes and scale that went in.

    Raises
    ------
    DTypeError when ``p`` is not a PackedTernary. (A payload holding the 2-bit value 3,
    which no ternary format writes, is refused when the PackedTernary is made.)
    """
    check_packed(p)
    codes = np.ascontiguousarray(get_format(p.format).decode(p.data, p.shape))
    return TernaryTensor(codes, p.scale, p.granularity, p.group_size, check=False)


def convert(p: PackedTernary, format: str) -> PackedTernary:
    """Repack ``p`` into ``format`` through its integer codes (never through float weights).

    Raises
    ------
    DTypeError when ``p`` is not a PackedTernary; FormatError for an unknown format or one
    that cannot hold ``p``'s scale granularity.
    """
    check_packed(p)
    if p.format == get_format(format).name:
        return p
    return pack(unpack(p), format)


def check_packed(p: object, name: str = "weights") -> None:
    """Raise DTypeError unless ``p`` is a PackedTernary."""
    if not isinstance(p, PackedTernary):
        raise errors.DTypeError(f"{name} must be a bn.PackedTernary (from bn.pack), got {type(p).__name__}")


KERNEL_FORMAT = "i2"  # the layout the matmul kernels read (Metal, CUDA, and the CPU without AVX-512 VNNI)


def kernel_layout(p: PackedTernary, format: str = KERNEL_FORMAT) -> PackedTernary:
    """``p`` in the kernel layout ``format``, repacked once and kept in ``p.cache[format]``.

    Every matmul backend goes through here, so a weight is repacked at most once however
    many devices use it.

    Raises
    ------
    FormatError for group-wise scales, which no matmul kernel takes (one scale per tensor or
    per output row).
    """
    if p.granularity == "group":
        raise errors.FormatError(
            f"matmul needs a per-tensor or per-channel weight scale, not granularity='group' "
            f"(group_size={p.group_size}); quantize with granularity='tensor' or 'channel'"
        )
    if p.format == format:
        return p
    if format not in p.cache:
        p.cache[format] = convert(p, format)
    return p.cache[format]


__all__ = ["FORMATS", "KERNEL_FORMAT", "Format", "PackedTernary", "check_packed", "convert", "get_format",
           "kernel_layout", "pack", "unpack"]

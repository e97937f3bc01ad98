"""PackedTernary, the Format record every packing format declares, and the registry."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import errors
from ..kernels import packing
from ..quant import check_scale


@dataclass(frozen=True)
class Format:
    """One packing format: its byte layout, what scales it can hold, and its codec.

    ``encode(codes, scale, granularity)`` gets C-contiguous int8 codes ``(m, k)`` and the
    float32 scale and returns the uint8 payload; ``decode(data, shape)`` returns the int8
    codes ``(m, k)``. ``packed_shape(shape)`` is the payload's shape for a tensor of ``shape``,
    which is how corrupt or truncated payloads are caught before decoding. ``code_fields(data)``,
    for the 2-bit formats, is the part of the payload holding codes as a 3-D uint8 view
    ``(rows, blocks, bytes)``, checked for the value 3; base-3 formats have none (every byte
    decodes to trits). ``row_group``: rows of the tensor per row of the payload (16 for
    ``i2x16``, whose bytes mix 16 rows; the last group padded).
    """

    name: str
    layout: str
    granularities: tuple[str, ...]
    packed_shape: Callable[[tuple[int, int]], tuple[int, ...]]
    encode: Callable[[np.ndarray, np.ndarray, str], np.ndarray]
    decode: Callable[[np.ndarray, tuple[int, int]], np.ndarray]
    scale_in_data: bool = False
    group_size: int | None = None
    code_fields: Callable[[np.ndarray], np.ndarray] | None = None
    row_group: int = 1

    def row_slices(self, rows: list[int]) -> list[slice] | None:
        """The payload rows of each of several tensors of ``rows`` rows stacked in this format, in order;
        None when one but the last ends inside a row group (its bytes would mix with the next one's)."""
        if any(count % self.row_group for count in rows[:-1]):
            return None
        starts = [0, *np.cumsum(rows[:-1]).tolist()]
        return [slice(start // self.row_group, ceil_div(start + count, self.row_group))
                for start, count in zip(starts, rows, strict=True)]


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise errors.unknown_name("packing format", name, FORMATS, errors.FormatError) from None


class PackedTernary:
    """Ternary weights packed in one of the formats of ``bn.formats.FORMATS``; immutable.

    ``PackedTernary(format, shape, data, scale, granularity="tensor", group_size=None)``
    checks everything once: the format, the shape, the payload's dtype and size, the scale,
    and that no 2-bit field holds the value 3 (which encodes no ternary weight). Every later
    use (``unpack``, ``bn.matmul``, the cached layouts) relies on that.

    The payload is not copied (payloads are model-sized, memory-mapped or stacked without a
    copy): the array passed as ``data`` is marked read-only, so writing through it raises,
    and ``p.data`` returns a read-only view (a new one each time, so reshaping it in place
    changes nothing here). A non-contiguous ``data`` is copied. Changing the bytes through
    another writeable view of the same memory (the base array of a slice you passed) is not
    supported: derived layouts in ``cache`` would not follow. A model's first CPU step moves
    the payloads of its projections once, into memory on huge pages (the same bytes; see
    ``bitnet.ops.gather_kernel_weights``): an array you passed no longer backs them then.

    Attributes
    ----------
    format : the format's name ("i2", "i2x16", "hf", "tq2_0", "tq1_0", "i2_s", "base3").
    shape : ``(out_features, in_features)`` of the unpacked tensor, both >= 1 (padding is not part of it).
    data : the uint8 payload, laid out as the format says (read-only).
    scale : float32, as in :class:`bn.TernaryTensor` (``()``, ``(m, 1)`` or ``(m, k // g)``),
        finite; a read-only copy. Formats that also store the scale inside ``data`` (fp16
        block scales in tq2_0/tq1_0, the fp32 tail of i2_s) keep the exact float32 value here.
    granularity, group_size : how ``scale`` maps onto the codes; the format must hold them.
    cache : derived layouts computed once and kept with the weights (e.g. the kernel layout
        ``bn.matmul`` repacks other formats into); valid for the object's whole life.

    Raises
    ------
    FormatError for an unknown format, one that cannot hold the granularity, a payload of
    the wrong size or one holding a 2-bit value 3; ShapeError for a shape that is not two
    integers >= 1 or a scale of the wrong shape; DTypeError for a payload that is not a uint8
    array or a scale that is not float32; InvalidValueError for a NaN/Inf scale or a bad
    granularity / group size.
    """

    __slots__ = ("format", "shape", "_data", "_scale", "granularity", "group_size", "cache")

    def __init__(self, format: str, shape: tuple[int, int], data: np.ndarray, scale: np.ndarray,
                 granularity: str = "tensor", group_size: int | None = None) -> None:
        fmt = get_format(format)
        shape = checked_shape(shape)
        scale = check_scale(shape, scale, granularity, group_size)
        check_holds(fmt, granularity, group_size)
        if not np.isfinite(scale).all():
            raise errors.InvalidValueError(f"the weight scale holds NaN or Inf ({scale.reshape(-1)[:4]}...); "
                                           f"a scale must be a finite float32")
        errors.check_array(data, "packed data")
        errors.check_dtype(data, "packed data", [np.uint8])
        expected = fmt.packed_shape(shape)
        if data.shape != expected:
            raise errors.FormatError(
                f"corrupt {format} payload for a {shape[0]}x{shape[1]} tensor: expected "
                f"{int(np.prod(expected))} bytes as shape {expected}, got shape {data.shape}. "
                f"The data may be truncated or belong to another tensor"
            )
        data = np.ascontiguousarray(data)
        if fmt.code_fields is not None and packing.holds_value_3(fmt.code_fields(data)):
            raise errors.FormatError(
                f"corrupt {format} payload: it holds the 2-bit value 3, which encodes no ternary weight"
            )
        data.flags.writeable = False  # the caller's own array too: writing through it would go unseen
        frozen_scale = scale.copy()
        frozen_scale.flags.writeable = False
        for name, value in (("format", format), ("shape", shape), ("_data", data.view()), ("_scale", frozen_scale),
                            ("granularity", granularity), ("group_size", group_size), ("cache", {})):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"PackedTernary is immutable: cannot set {name!r}; make a new one (bn.pack, bn.convert)")

    __delattr__ = __setattr__

    def __reduce__(self):
        """Copies and pickles are made through the constructor (checked again; ``cache`` left behind)."""
        return (PackedTernary, (self.format, self.shape, self._data, self._scale, self.granularity, self.group_size))

    def __repr__(self) -> str:
        return (f"PackedTernary(format={self.format!r}, shape={self.shape}, data=<uint8 {self._data.shape}>, "
                f"granularity={self.granularity!r}, group_size={self.group_size})")

    def _hold_in(self, copy: np.ndarray) -> None:
        """Keep the payload in ``copy`` from now on: the same bytes in other memory (on huge pages,
        ``bitnet.ops.gather_kernel_weights``). Storage only: the object stays what it was."""
        if copy.shape != self._data.shape or copy.dtype != self._data.dtype or copy.flags.writeable:
            raise errors.FormatError(f"a payload moves only into a read-only copy of shape {self._data.shape}")
        object.__setattr__(self, "_data", copy.view())

    @property
    def data(self) -> np.ndarray:
        """The uint8 payload, as a new read-only view."""
        return self._data.view()

    @property
    def scale(self) -> np.ndarray:
        """The float32 scale, as a new read-only view."""
        return self._scale.view()

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the format occupies: payload, plus the scale where it is kept beside the payload."""
        stored_scale = 0 if get_format(self.format).scale_in_data else self._scale.nbytes
        return self._data.nbytes + stored_scale

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel


def check_holds(fmt: Format, granularity: str, group_size: int | None) -> None:
    """FormatError, naming the formats that can, unless ``fmt`` holds scales of ``granularity``."""
    if granularity in fmt.granularities and (granularity != "group" or group_size == fmt.group_size):
        return
    held = ", ".join(fmt.granularities) + (f" (groups of {fmt.group_size})" if fmt.group_size else "")
    able = [f.name for f in FORMATS.values() if granularity in f.granularities]
    raise errors.FormatError(
        f"format {fmt.name!r} cannot hold a {granularity} scale"
        f"{f' with group_size={group_size}' if group_size else ''}; it holds: {held}. "
        f"Quantize with granularity='tensor', or pack into one of: {', '.join(able)}"
    )


def checked_shape(shape) -> tuple[int, int]:
    """``shape`` as two Python ints >= 1; ShapeError otherwise (empty weights are refused, as by quantize_weights)."""
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        dims = None
    if dims is None or len(dims) != 2 or min(dims) < 1:
        raise errors.ShapeError(
            f"the shape of packed weights must be two integers (out_features, in_features), both >= 1; "
            f"got {shape!r}"
        )
    return dims


def pad_columns(codes: np.ndarray, multiple: int, fill: int = 0) -> np.ndarray:
    """``codes`` with ``fill`` codes appended to each row up to a multiple of ``multiple`` columns."""
    tail = -codes.shape[1] % multiple
    return np.pad(codes, ((0, 0), (0, tail)), constant_values=fill) if tail else codes


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)

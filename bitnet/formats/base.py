"""PackedTernary, the Format record every packing format declares, and the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import errors
from ..quant import check_scale_shape


@dataclass(frozen=True)
class Format:
    """One packing format: its byte layout, what scales it can hold, and its codec.

    ``encode(codes, scale, granularity)`` gets C-contiguous int8 codes ``(m, k)`` and the
    float32 scale and returns the uint8 payload; ``decode(data, shape)`` returns the int8
    codes ``(m, k)``. ``packed_shape(shape)`` is the payload's shape for a tensor of ``shape``,
    which is how corrupt or truncated payloads are caught before decoding.
    """

    name: str
    layout: str
    granularities: tuple[str, ...]
    packed_shape: Callable[[tuple[int, int]], tuple[int, ...]]
    encode: Callable[[np.ndarray, np.ndarray, str], np.ndarray]
    decode: Callable[[np.ndarray, tuple[int, int]], np.ndarray]
    scale_in_data: bool = False
    group_size: int | None = None


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise errors.unknown_name("packing format", name, FORMATS, errors.FormatError) from None


@dataclass(frozen=True, eq=False)
class PackedTernary:
    """Ternary weights packed in one of the formats of ``bn.formats.FORMATS``.

    Attributes
    ----------
    format : the format's name ("i2", "hf", "tq2_0", "tq1_0", "i2_s", "base3").
    shape : ``(out_features, in_features)`` of the unpacked tensor (padding is not part of it).
    data : the uint8 payload, laid out as the format says.
    scale : float32, as in :class:`bn.TernaryTensor` (``()``, ``(m, 1)`` or ``(m, k // g)``).
        Formats that also store the scale inside ``data`` (fp16 block scales in tq2_0/tq1_0,
        the fp32 tail of i2_s) keep the exact float32 value here.
    granularity, group_size : how ``scale`` maps onto the codes.
    cache : derived layouts computed once and kept with the weights (e.g. the kernel layout
        ``bn.matmul`` repacks other formats into).
    """

    format: str
    shape: tuple[int, int]
    data: np.ndarray
    scale: np.ndarray
    granularity: str = "tensor"
    group_size: int | None = None
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        errors.check_dtype(self.data, "packed data", [np.uint8])
        errors.check_dtype(self.scale, "scale", [np.float32])
        check_scale_shape(self.shape, self.scale, self.granularity, self.group_size)
        expected = fmt.packed_shape(self.shape)
        if self.data.shape != expected:
            raise errors.FormatError(
                f"corrupt {self.format} payload for a {self.shape[0]}x{self.shape[1]} tensor: expected "
                f"{int(np.prod(expected))} bytes as shape {expected}, got shape {self.data.shape}. "
                f"The data may be truncated or belong to another tensor"
            )

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the format occupies: payload, plus the scale where it is kept beside the payload."""
        stored_scale = 0 if get_format(self.format).scale_in_data else self.scale.nbytes
        return self.data.nbytes + stored_scale

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel


def pad_columns(codes: np.ndarray, multiple: int, fill: int = 0) -> np.ndarray:
    """``codes`` with ``fill`` codes appended to each row up to a multiple of ``multiple`` columns."""
    tail = -codes.shape[1] % multiple
    return np.pad(codes, ((0, 0), (0, tail)), constant_values=fill) if tail else codes


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)

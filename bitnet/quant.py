"""Quantized tensors and the quantizers that make them.

``quantize_weights`` turns a float weight matrix into a :class:`TernaryTensor` (codes in
{-1, 0, +1} plus a float32 scale); ``quantize_activations`` turns float activations into
int8 with one scale per row. These are the BitNet b1.58 formulas, written once here and
checked against plain numpy in the tests.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass

import numpy as np

from . import errors
from .kernels import quantize as kq

GRANULARITIES = ("tensor", "channel", "group")
METHODS = ("absmean", "threshold", "uniform")
UNIFORM_BITS = (2, 4, 8)
THRESHOLD_DEFAULT = 0.7  # TWN's delta = 0.7 * mean|w|
THRESHOLD_SEARCH = np.round(np.arange(0.05, 1.501, 0.05), 2)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Integer codes and float32 scales: ``dequantize() == codes * scale`` (scale expanded).

    Attributes
    ----------
    codes : ndarray of int8, the shape of the original tensor.
    scale : ndarray of float32, shape ``()`` (per tensor), ``(m, 1)`` (per output channel)
        or ``(m, k // group_size)`` (per group of ``group_size`` consecutive inputs).
    granularity : "tensor", "channel" or "group".
    group_size : int or None, the group length for ``granularity="group"``.
    bits : bits per code of the quantizer (1.58 for ternary).
    check : constructor flag, default True: verify the codes' values (a pass over every code).
        Code that made the codes itself (quantizers, unpacking) passes False.
    """

    codes: np.ndarray
    scale: np.ndarray
    granularity: str = "tensor"
    group_size: int | None = None
    bits: float = 1.58
    check: InitVar[bool] = True

    def __post_init__(self, check: bool) -> None:
        errors.check_array(self.codes, "codes")
        errors.check_dtype(self.codes, "codes", [np.int8])
        # A numpy scalar (np.float32(0.5)) is a scale of shape (); keep it as a 0-d array.
        object.__setattr__(self, "scale", check_scale(self.codes.shape, self.scale, self.granularity,
                                                      self.group_size))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    def expanded_scale(self) -> np.ndarray:
        """The scale broadcast to one float32 per code (a view where possible)."""
        if self.granularity == "group":
            return np.repeat(self.scale, self.group_size, axis=-1)
        return self.scale

    def dequantize(self) -> np.ndarray:
        """Float32 weights ``codes * scale``."""
        return self.codes.astype(np.float32) * self.expanded_scale()


class TernaryTensor(QuantizedTensor):
    """A :class:`QuantizedTensor` whose codes are -1, 0 or +1 (what every packing format holds)."""

    def __post_init__(self, check: bool) -> None:
        super().__post_init__(check)
        if check and not kq.codes_are_ternary(np.ascontiguousarray(self.codes)):
            errors.check_ternary_codes(self.codes)  # raises, saying which values are wrong


def check_scale(shape, scale, granularity: str, group_size: int | None) -> np.ndarray:
    """``scale`` as a float32 array, after checking it fits a tensor of ``shape`` as ``granularity`` says.

    Raises
    ------
    InvalidValueError for an unknown granularity or a group size that does not divide the
    last axis (or one given without ``granularity="group"``); DTypeError for a scale that
    is not float32; ShapeError for a scale of the wrong shape.
    """
    check_granularity(granularity, group_size, shape[-1] if len(shape) else 0)
    if granularity != "tensor" and len(shape) != 2:
        raise errors.ShapeError(f"a {granularity} scale needs 2-D codes (out_features, in_features), got shape {shape}")
    if isinstance(scale, np.generic):
        scale = np.asarray(scale)
    errors.check_array(scale, "scale")
    errors.check_dtype(scale, "scale", [np.float32])
    expected = scale_shape(shape, granularity, group_size)
    if scale.shape != expected:
        raise errors.ShapeError(
            f"a {granularity} scale for a tensor of shape {tuple(shape)} must have shape {expected}, "
            f"got {scale.shape}"
        )
    return scale


def scale_shape(shape, granularity: str, group_size: int | None) -> tuple[int, ...]:
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return (shape[0], 1)
    return (shape[0], shape[1] // group_size)


def check_granularity(granularity: str, group_size: int | None, features: int) -> None:
    """InvalidValueError for an unknown granularity, or a group size that is not a whole number
    >= 1 dividing ``features`` (or is given without ``granularity="group"``)."""
    errors.check_choice("granularity", granularity, GRANULARITIES)
    if granularity != "group":
        if group_size is not None:
            raise errors.InvalidValueError(f"group_size only applies to granularity='group', got {group_size!r}")
        return
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1 \
            or features % group_size:
        raise errors.InvalidValueError(
            f"granularity='group' needs an integer group_size >= 1 that divides in_features={features}, "
            f"got {group_size!r}"
        )


def _grouping(w: np.ndarray, granularity: str, group_size: int | None) -> int:
    """Validate the granularity for ``w`` and return the group length along the last axis."""
    check_granularity(granularity, group_size, w.shape[-1])
    if granularity == "tensor":
        return w.shape[-1]
    if w.ndim != 2:
        raise errors.ShapeError(
            f"granularity={granularity!r} needs a 2-D weight (out_features, in_features), got shape {w.shape}"
        )
    return w.shape[1] if granularity == "channel" else int(group_size)


def _checked_factor(factor) -> float:
    """``factor`` as a float; InvalidValueError unless it is a finite real number >= 0."""
    if isinstance(factor, (int, float, np.integer, np.floating)) and not isinstance(factor, bool):
        if np.isfinite(float(factor)) and factor >= 0:
            return float(factor)
    raise errors.InvalidValueError(f"factor must be a finite number >= 0 (or None to search), got {factor!r}")


def _validated_weights(w) -> np.ndarray:
    """``w`` as float32/float64 after the dtype and shape checks (finiteness is checked later)."""
    w = np.asarray(w)
    errors.check_float(w, "weights")
    if w.ndim == 0 or w.size == 0:
        raise errors.ShapeError(f"weights must be a non-empty array of rank >= 1, got shape {w.shape}")
    if w.dtype not in (np.float32, np.float64):
        w = w.astype(np.float32)
    return w


def _as_rows(w: np.ndarray) -> np.ndarray:
    """A C-contiguous 2-D view (rows, last axis) of ``w``."""
    return np.ascontiguousarray(w.reshape(-1, w.shape[-1]))


def _grouped(rows: np.ndarray, granularity: str, group: int) -> np.ndarray:
    """A 3-D view ``(row groups, groups per row, group length)``; ``(1, 1, n)`` for the tensor."""
    if granularity == "tensor":
        return rows.reshape(1, 1, -1)
    return rows.reshape(rows.shape[0], -1, group)


def _shaped_scale(scale2d: np.ndarray, granularity: str) -> np.ndarray:
    scale2d = scale2d.astype(np.float32)
    return scale2d.reshape(()) if granularity == "tensor" else scale2d


def _absmean(rows: np.ndarray, granularity: str, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The scale ``(1, 1)`` or ``(m, groups)`` and codes, through the Numba kernels."""
    sums = kq.row_group_abs_sums(rows, group)
    if not np.isfinite(sums).all():  # a float64 sum of |float32| is finite iff every term is
        errors.check_finite(rows, "weights")
    mean = np.array([[sums.sum() / rows.size]]) if granularity == "tensor" else sums / group
    with np.errstate(over="ignore"):  # an overflow is reported just below, as a library error
        scale2d = np.maximum(mean.astype(np.float32), kq.WEIGHT_SCALE_MIN)
    errors.check_finite(scale2d, "the float32 weight scale (weights beyond float32 range)")
    per_row = np.broadcast_to(round_half_thresholds(scale2d, rows.dtype), (rows.shape[0], scale2d.shape[1]))
    return scale2d, kq.ternarize(rows, np.ascontiguousarray(per_row), group)


def round_half_thresholds(scale: np.ndarray, dtype) -> np.ndarray:
    """Per scale ``s``, the largest ``t`` of ``dtype`` with ``rint(t / s) == 0`` in that dtype.

    ``fl(|w| / s)`` never decreases as ``|w|`` grows and is exactly 0.5 at ``|w| = s / 2``
    (which rounds half-to-even to 0). One ulp above, the quotient is at most a tie that
    rounds back to 0.5; two ulps above it exceeds 0.5. So ``clip(rint(w / s), -1, 1)`` equals
    ``sign(w) * (|w| > t)`` with ``t`` one of ``s/2``, ``s/2 + 1 ulp``: the same codes as the
    formula, found with compares instead of a division per weight.
    """
    dtype = np.dtype(dtype).type
    s = scale.astype(dtype)
    t = s * dtype(0.5)
    above = np.nextafter(t, dtype(np.inf))
    return np.where(above / s <= dtype(0.5), above, t)


def _threshold(rows: np.ndarray, granularity: str, group: int, factor: float):
    absw = np.abs(_grouped(rows, granularity, group).astype(np.float64))
    mean = absw.mean(axis=-1, keepdims=True)
    keep = absw > factor * mean
    kept = keep.sum(axis=-1, keepdims=True)
    alpha = np.where(kept > 0, (absw * keep).sum(axis=-1, keepdims=True) / np.maximum(kept, 1), mean)
    scale2d = np.maximum(alpha[..., 0].astype(np.float32), kq.WEIGHT_SCALE_MIN)
    codes = (np.sign(_grouped(rows, granularity, group)) * keep).astype(np.int8)
    return scale2d, codes.reshape(rows.shape)


def _uniform(rows: np.ndarray, granularity: str, group: int, bits: int):
    levels = 2 ** (bits - 1) - 1
    grouped = _grouped(rows, granularity, group)
    absmax = np.abs(grouped).max(axis=-1, keepdims=True).astype(np.float32)
    scale3d = np.maximum(absmax, kq.WEIGHT_SCALE_MIN) / np.float32(levels)
    codes = np.clip(np.rint(grouped / scale3d), -levels, levels).astype(np.int8)
    return scale3d[..., 0], codes.reshape(rows.shape)


def _mse_of(rows: np.ndarray, granularity: str, group: int, scale2d: np.ndarray, codes: np.ndarray) -> float:
    grouped = _grouped(codes, granularity, group) * scale2d[..., None]
    return float(np.mean((_grouped(rows, granularity, group) - grouped) ** 2))


def quantize_weights(
    w,
    granularity: str = "tensor",
    group_size: int | None = None,
    method: str = "absmean",
    *,
    factor: float | None = THRESHOLD_DEFAULT,
    bits: int = 2,
) -> QuantizedTensor:
    """Quantize float weights to ternary codes (or to ``bits``-bit codes for ``method="uniform"``).

    Parameters
    ----------
    w : array_like of float, shape ``(out_features, in_features)`` (any rank >= 1 for
        ``granularity="tensor"``).
    granularity : "tensor", "channel" or "group"
        One scale for the whole tensor (BitNet b1.58), one per output row, or one per
        ``group_size`` consecutive inputs of a row.
    group_size : int, required for ``granularity="group"``; must divide ``in_features``.
    method : "absmean", "threshold" or "uniform"
        ``absmean`` (the paper): ``s = max(mean|w|, 1e-5)``, ``codes = clip(round(w / s), -1, 1)``
        with round-half-to-even. ``threshold`` (TWN): ``codes = sign(w) * (|w| > factor * mean|w|)``
        and ``s`` = mean of the kept ``|w|``; ``factor=None`` searches 0.05, 0.10, ..., 1.50 for
        the lowest mean squared error. ``uniform``: symmetric absmax ``bits``-bit codes in
        ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``; ``bits=2`` gives ternary codes.
    factor : float or None, the threshold factor (``method="threshold"`` only).
    bits : 2, 4 or 8 (``method="uniform"`` only).

    Returns
    -------
    TernaryTensor (every method except uniform with ``bits`` 4 or 8, which gives a
    :class:`QuantizedTensor`).

    Raises
    ------
    DTypeError for non-float input; ShapeError for an empty or 0-D array, or a rank other
    than 2 with per-channel/group scales; InvalidValueError for NaN/Inf, an unknown method,
    granularity or bit width, a group size that is not an integer dividing ``in_features``,
    or a factor that is not a finite number >= 0.

    Examples
    --------
    >>> import numpy as np, bitnet as bn
    >>> t = bn.quantize_weights(np.array([[0.4, -1.2, 0.05, 2.0]], np.float32))
    >>> t.codes, float(t.scale)
    (array([[ 0, -1,  0,  1]], dtype=int8), 0.9125000238418579)
    """
    errors.check_choice("method", method, METHODS)
    if method == "uniform":
        errors.check_choice("bit width", bits, UNIFORM_BITS)
    if method == "threshold" and factor is not None:
        factor = _checked_factor(factor)
    w = _validated_weights(w)
    group = _grouping(w, granularity, group_size)
    rows = _as_rows(w)
    if method != "absmean":
        errors.check_finite(rows, "weights")
    if method == "absmean":
        scale2d, codes = _absmean(rows, granularity, group)
    elif method == "threshold":
        if factor is None:
            trials = [_threshold(rows, granularity, group, f) for f in THRESHOLD_SEARCH]
            scale2d, codes = min(trials, key=lambda sc: _mse_of(rows, granularity, group, *sc))
        else:
            scale2d, codes = _threshold(rows, granularity, group, factor)
    else:
        scale2d, codes = _uniform(rows, granularity, group, bits)
    cls = TernaryTensor if method != "uniform" or bits == 2 else QuantizedTensor
    return cls(codes.reshape(w.shape), _shaped_scale(scale2d, granularity), granularity,
               group_size if granularity == "group" else None, 1.58 if cls is TernaryTensor else float(bits),
               check=False)  # every quantizer above makes codes in range


def quantize_activations(x, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (per-token) absmax int8 quantization of activations.

    ``a = 127 / max(max|x_row|, 1e-5)``, ``q = clip(round(x * a), -128, 127)``, in float32.

    Parameters
    ----------
    x : array_like of float, shape ``(k,)`` or ``(n, k)``.
    bits : only 8 is supported (the BitNet b1.58 activation width).

    Returns
    -------
    q : ndarray of int8, the shape of ``x``.
    a : ndarray of float32, shape ``(n, 1)`` (``(1,)`` for 1-D ``x``). ``x ~= q / a``.
        A row holding NaN or Inf gets ``a = NaN`` (and ``q = 0``), so results scaled by it are NaN.

    Raises
    ------
    DTypeError for non-float input; ShapeError for a rank other than 1 or 2 or an empty row;
    InvalidValueError for ``bits != 8``.
    """
    errors.check_choice("activation bit width (only 8-bit activations are supported)", bits, (8,))
    x = np.asarray(x)
    errors.check_float(x, "activations")
    errors.check_ndim(x, "activations", (1, 2))
    if x.shape[-1] == 0:
        raise errors.ShapeError(f"activations must have at least one feature, got shape {x.shape}")
    rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
    q = np.empty(rows.shape, np.int8)
    a = np.empty(rows.shape[0], np.float32)
    kq.quantize_padded(rows, q, a, np.empty(rows.shape[0], np.int32))  # the matmul's own quantizer
    return q.reshape(x.shape), a.reshape((1,) if x.ndim == 1 else (-1, 1))

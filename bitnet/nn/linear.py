"""BitLinear: ternary weights, int8 per-token activations, one float scale per output."""

from __future__ import annotations

import numpy as np

from .. import backends, errors
from ..formats import PackedTernary, convert, get_format, pack, unpack
from ..ops import WEIGHT_FORMAT, matmul, matmul_rows
from ..quant import TernaryTensor, quantize_weights
from . import checks, scratch
from .changes import Tracked
from .norm import RMSNorm, check_norm


class BitLinear(Tracked):
    """``y = matmul(norm(x), W) + bias`` with ``W`` ternary and ``x`` quantized per row to int8.

    ``bn.matmul`` does the work: per-row absmax int8 quantization of the input, the integer
    ternary matmul, then ``acc / a * scale``. That is the forward of HF's ``BitLinear`` and
    ``AutoBitLinear`` (offline mode) up to float rounding.

    Parameters
    ----------
    weight : PackedTernary of shape ``(out_features, in_features)``; repacked into the layout
        the CPU kernels read (``bn.ops.WEIGHT_FORMAT``: ``"i2x16"`` on AVX-512 VNNI, else
        ``"i2"``) if it is in another format.
    bias : optional float array ``(out_features,)``.
    input_norm : optional RMSNorm applied to the input first (HF's ``use_rms_norm=True``).
    """

    def __init__(
        self, weight: PackedTernary, bias: np.ndarray | None = None, input_norm: RMSNorm | None = None
    ) -> None:
        self.weight = weight
        self.bias = None if bias is None else checks.float_vector(bias, "bias")
        self.input_norm = input_norm
        self.check()
        self.weight = convert(weight, WEIGHT_FORMAT)  # the same shape in the kernels' layout
        self.checkpoint_scale: tuple[np.ndarray, bool] | None = None
        self.tag: str | None = None  # role of the output buffer shared across layers (scratch.reused)

    def check(self, shape: tuple[int, int] | None = None, name: str = "BitLinear", why: str = "") -> None:
        """Raise unless this layer can run (as ``shape`` = ``(out_features, in_features)``, when given):
        2-D ternary weights, a float32 bias of ``out_features`` or None, an RMSNorm over
        ``in_features`` or None. The kernels check none of it, and a user may have assigned any
        of it since construction. ``name`` says which projection this is in messages, ``why``
        what sets its shape.
        """
        if not isinstance(self.weight, PackedTernary) or len(self.weight.shape) != 2:
            raise errors.DTypeError(f"{name} weights must be a 2-D bn.PackedTernary, got {self.weight!r:.80}")
        if shape is not None and self.weight.shape != tuple(shape):
            raise errors.ShapeError(f"{name} is {self.out_features}x{self.in_features}; {shape[0]}x{shape[1]} is "
                                    f"needed{f' ({why})' if why else ''}")
        if self.bias is not None:
            checks.float32_vector(self.bias, f"the bias of {name}", self.out_features)
        check_norm(self.input_norm, self.in_features, f"the input_norm of {name}", optional=True)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @classmethod
    def from_float(
        cls, w: np.ndarray, bias: np.ndarray | None = None, input_norm: RMSNorm | None = None
    ) -> BitLinear:
        """Quantize float weights ``(out_features, in_features)`` with absmean (one scale per tensor)."""
        return cls(pack(quantize_weights(w), WEIGHT_FORMAT), bias, input_norm)

    @classmethod
    def from_packed(
        cls,
        data: np.ndarray,
        shape: tuple[int, int],
        weight_scale: float | np.ndarray,
        format: str = "hf",
        divide: bool = False,
        bias: np.ndarray | None = None,
        input_norm: RMSNorm | None = None,
    ) -> BitLinear:
        """Wrap packed bytes ``data`` (``format``) with a checkpoint's per-tensor ``weight_scale``.

        The weights are ``codes * weight_scale``, or ``codes / weight_scale`` with ``divide=True``
        (HF ``linear_class: "bitlinear"``). The stored value is kept as ``checkpoint_scale``
        so that saving writes back the same bytes.
        """
        try:
            stored = np.asarray(weight_scale, dtype=np.float32).reshape(())
        except (TypeError, ValueError):
            raise errors.InvalidValueError(f"weight_scale must be one number, got {weight_scale!r:.80}") from None
        # A stored 0 divides into an Inf scale, which BitNetForCausalLM.from_weights refuses by tensor name.
        with np.errstate(divide="ignore"):
            scale = (np.float32(1.0) / stored) if divide else stored
        weight = PackedTernary(format, tuple(shape), np.ascontiguousarray(data), np.asarray(scale, np.float32))
        layer = cls(weight, bias, input_norm)
        layer.checkpoint_scale = (stored, divide)
        return layer

    @classmethod
    def stacked(cls, layers: list[BitLinear]) -> BitLinear:
        """One layer computing the outputs of ``layers`` side by side (e.g. q, k and v).

        The layers share their input, so its int8 quantization is done once; each keeps
        its own scale as a per-output-channel scale. Layers with a bias or an input norm
        cannot be stacked.
        """
        if any(layer.bias is not None or layer.input_norm is not None for layer in layers):
            raise errors.InvalidValueError("only layers without bias or input norm can be stacked")
        weights = [layer.weight for layer in layers]
        scale = np.concatenate([np.broadcast_to(w.scale, (w.shape[0], 1)) for w in weights]).astype(np.float32)
        shape = (sum(w.shape[0] for w in weights), weights[0].shape[1])
        slices = get_format(WEIGHT_FORMAT).row_slices([w.shape[0] for w in weights])
        if slices is None:  # a layer ends inside a row group: repack the stack from the codes
            codes = np.concatenate([unpack(w).codes for w in weights])
            return cls(pack(TernaryTensor(codes, scale, "channel", check=False), WEIGHT_FORMAT))
        data = _adjacent_rows([w.data for w in weights])
        if data is None:
            data = np.concatenate([w.data for w in weights])
        # The layers keep their own weights as row views of the stacked bytes: no second copy.
        for layer, w, rows in zip(layers, weights, slices, strict=True):
            layer.weight = PackedTernary(WEIGHT_FORMAT, w.shape, data[rows], w.scale, w.granularity, w.group_size)
        return cls(PackedTernary(WEIGHT_FORMAT, shape, data, scale, "channel"))

    device = backends.CPU
    """Where the matmul runs: ``"cpu"``, or a backend of ``bn.devices()`` chosen with :meth:`to`."""

    def to(self, device: str) -> BitLinear:
        """Run this layer's matmul on ``device`` from now on; returns the layer.

        A GPU backend with an ``upload`` (Metal) gets the weights now, once; ``bn.matmul``
        reuses that copy. Raises DeviceError, with the reason, if ``device`` is not available.
        """
        if device != backends.CPU:
            backend = backends.get_backend(device)
            if hasattr(backend, "upload"):
                backend.upload(self.weight)
        self.device = device
        return self

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x`` of shape ``(n, in_features)`` float32 -> ``(n, out_features)`` float32 step temporary."""
        self.check()
        checks.check_rows(x, "BitLinear input", self.in_features)
        return self._forward(x)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """``self(x)`` for an ``x`` the caller has checked: the calls of the layers built on this one,
        which check their own input once instead of at every step inside."""
        if self.input_norm is not None:
            x = self.input_norm._forward(x)
        out = scratch.reused(self.tag, (x.shape[0], self.out_features))
        if self.device == backends.CPU and x.flags.c_contiguous:  # checked here and at construction
            matmul_rows(x, self.weight, out)
        else:
            out = matmul(x, self.weight, out=out, device=self.device)
        if self.bias is not None:
            out += self.bias
        return out


def check_projection(layer: object, shape: tuple[int, int], name: str, why: str) -> None:
    """Raise unless ``layer`` is a :class:`BitLinear` that can run as ``shape`` (``(out, in)``); ``why`` says
    what sets that shape, for the message."""
    if not isinstance(layer, BitLinear):
        raise errors.DTypeError(f"{name} must be a BitLinear layer, got {type(layer).__name__}")
    layer.check(shape, name, why)


def _adjacent_rows(arrays: list[np.ndarray]) -> np.ndarray | None:
    """The one array that ``arrays`` are consecutive row blocks of, or None if they are not.

    Weights built already side by side (e.g. by ``bitnet.models.random_model``) are then
    stacked without a copy, which keeps a big model's peak memory at its size.
    """
    owner = arrays[0].base
    if not isinstance(owner, np.ndarray) or not owner.flags.c_contiguous:
        return None
    base = owner.reshape(-1).view(arrays[0].dtype)  # in the rows' dtype, even if the bytes were made as words
    row_bytes = arrays[0].shape[1] * base.itemsize
    offset = arrays[0].ctypes.data - base.ctypes.data
    for before, after in zip(arrays, arrays[1:], strict=False):
        if after.base is not owner or after.shape[1] != arrays[0].shape[1] or not after.flags.c_contiguous:
            return None
        if after.ctypes.data != before.ctypes.data + before.nbytes:
            return None
    if offset % row_bytes or base.nbytes % row_bytes:
        return None
    start = offset // row_bytes
    return base.reshape(-1, arrays[0].shape[1])[start : start + sum(a.shape[0] for a in arrays)]

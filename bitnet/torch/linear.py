"""Quantization-aware ``BitLinear`` for PyTorch, and ``replace_linear`` to put it in any model.

The forward is the one bitnet's kernels compute, written with straight-through estimators:

    a = 127 / max(max|x_token|, 1e-5)        s = max(mean|W|, 1e-5)   (float64 mean, rounded once)
    y = (clip(round(x a), -128, 127) @ clip(round(W / s), -1, 1).T) / a * s

``round`` and ``clip`` pass gradients straight through (``v + (q(v) - v).detach()``), so the
latent float weights and the activations get the gradient of ``x @ W.T`` evaluated at the
quantized values. In float32 the rounded operands are exact integers and their products are
summed exactly (below 2**24), so an eval-mode forward equals ``bn.matmul`` to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import errors
from ..kernels.quantize import ACTIVATION_ABSMAX_MIN, INT8_LEVELS, WEIGHT_SCALE_MIN

GRANULARITIES = ("tensor", "channel")


def weight_scale(weight: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    """absmean scale ``max(mean|W|, 1e-5)``: shape ``()`` per tensor or ``(out, 1)`` per channel (no gradient)."""
    magnitudes = weight.detach().abs().double()
    mean = magnitudes.mean() if granularity == "tensor" else magnitudes.mean(dim=1, keepdim=True)
    return mean.float().clamp_min(float(WEIGHT_SCALE_MIN))


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token ``a = 127 / max(max|x|, 1e-5)`` over the last axis, float32, keepdim (no gradient)."""
    absmax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    # a tensor numerator: ``127.0 / t`` is ``t.reciprocal() * 127`` in torch, 1 ulp off a quarter of the time
    return torch.full_like(absmax, float(INT8_LEVELS)) / absmax.clamp_min(float(ACTIVATION_ABSMAX_MIN))


def _straight_through(v: torch.Tensor, low: float, high: float, strength: float) -> torch.Tensor:
    """``v`` moved ``strength`` of the way to ``clip(round(v), low, high)``, with the identity as gradient."""
    return v + strength * (v.round().clamp(low, high) - v).detach()


class BitLinear(nn.Linear):
    """``nn.Linear`` trained as BitNet b1.58: ternary absmean weights, per-token int8 activations.

    Parameters
    ----------
    in_features, out_features, bias, device, dtype : as for ``nn.Linear``.
    granularity : "tensor" (one weight scale, BitNet b1.58) or "channel" (one per output row).

    Attributes
    ----------
    strength : float in [0, 1], the progressive-quantization ``lambda``: 0 is the float layer,
        1 (the default) the fully quantized one; in between, weights and activations are
        mixed ``v + lambda (q(v) - v)``.

    Examples
    --------
    >>> import torch
    >>> from bitnet.torch import BitLinear
    >>> layer = BitLinear(256, 64)
    >>> layer(torch.randn(3, 256)).shape
    torch.Size([3, 64])
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
        granularity: str = "tensor",
    ) -> None:
        if granularity not in GRANULARITIES:
            raise errors.unknown_name("granularity", granularity, GRANULARITIES)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.granularity = granularity
        self.strength = 1.0

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "tensor") -> BitLinear:
        """A BitLinear sharing ``linear``'s weight and bias parameters."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, "meta", granularity=granularity)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 codes ``clip(round(W / s), -1, 1)`` and the float32 scale ``s`` this layer multiplies by."""
        s = weight_scale(self.weight, self.granularity)
        return (self.weight.detach().float() / s).round().clamp(-1, 1).to(torch.int8), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strength == 0.0:
            return F.linear(x, self.weight, self.bias)
        a = activation_scale(x)
        s = weight_scale(self.weight, self.granularity)
        q = _straight_through(x.float() * a, -128.0, 127.0, self.strength)
        codes = _straight_through(self.weight / s, -1.0, 1.0, self.strength)
        y = F.linear(q, codes) / a * s.reshape(-1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.granularity}, strength={self.strength}"


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == e or name.endswith("." + e) for e in exclude)


def replace_linear(
    model: nn.Module, exclude: tuple[str, ...] = ("lm_head",), granularity: str = "tensor"
) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for a :class:`BitLinear` holding the same parameters, in place.

    Parameters
    ----------
    model : any torch module (transformers' Llama and BitNet models included).
    exclude : module names (or name suffixes after a dot) to leave in float, e.g. the output head.
    granularity : weight scale granularity of the new layers, "tensor" or "channel".

    Returns
    -------
    The same ``model``. Its forward is unchanged until quantization is on, which it is by
    default; :func:`set_quantization` with 0 gives back the float forward exactly.
    """
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not _excluded(name, exclude)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, BitLinear.from_linear(module, granularity))
    return model


def set_quantization(model: nn.Module, strength: float) -> None:
    """Set the progressive-quantization ``lambda`` of every BitLinear in ``model`` (0 float, 1 ternary)."""
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise errors.InvalidValueError(f"quantization strength must lie in [0, 1], got {strength}")
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.strength = strength

"""The gated feed-forward block: ``down(sub_norm(act(gate(x)) * up(x)))``, ``act`` relu2 or silu."""

from __future__ import annotations

import numpy as np

from .. import errors
from . import float_kernels, scratch
from .linear import BitLinear
from .norm import RMSNorm

ACTIVATIONS = ("relu2", "silu")
_NO_NORM = np.ones(1, np.float32)  # the kernel's weight argument when there is no sub-norm


class MLP:
    """Gated MLP, with BitNet's ``ffn_sub_norm`` before the down projection where the family has one.

    Parameters
    ----------
    gate_proj, up_proj : BitLinear ``hidden -> intermediate``.
    down_proj : BitLinear ``intermediate -> hidden``.
    sub_norm : RMSNorm over ``intermediate`` (BitNet b1.58, 1bitLLM), or None (Llama-architecture ternary).
    activation : "relu2" (BitNet b1.58 2B4T) or "silu" (1bitLLM, Llama).
    """

    def __init__(
        self, gate_proj: BitLinear, up_proj: BitLinear, down_proj: BitLinear, sub_norm: RMSNorm | None,
        activation: str = "relu2",
    ) -> None:
        if activation not in ACTIVATIONS:
            raise errors.unknown_name("MLP activation", activation, ACTIVATIONS, errors.ConfigError)
        if sub_norm is not None and sub_norm.weight.shape != (gate_proj.out_features,):
            raise errors.ShapeError(
                f"the FFN sub-norm has {sub_norm.weight.shape[0]} features, the MLP {gate_proj.out_features}"
            )
        self.projections = (gate_proj, up_proj)
        self.down_proj = down_proj
        self.sub_norm = sub_norm
        self.activation = activation
        try:
            self.gate_up_proj = BitLinear.stacked([gate_proj, up_proj])
            self.gate_up_proj.tag = "mlp.gate_up_proj"
        except errors.InvalidValueError:
            self.gate_up_proj = None
        for name, proj in zip(("gate_proj", "up_proj", "down_proj"), (gate_proj, up_proj, down_proj), strict=True):
            proj.tag = f"mlp.{name}"

    @property
    def running_linears(self) -> tuple[BitLinear, ...]:
        """The projections the forward pass calls: the stacked gate/up one in place of its parts."""
        gate_up = (self.gate_up_proj,) if self.gate_up_proj is not None else self.projections
        return (*gate_up, self.down_proj)

    def _gate_up(self, x: np.ndarray) -> np.ndarray:
        """``[gate(x) | up(x)]`` side by side: ``(n, 2 intermediate)``."""
        if self.gate_up_proj is not None:
            return self.gate_up_proj(x)
        parts = [proj(x) for proj in self.projections]
        gate_up = scratch.reused("mlp.gate_up", (x.shape[0], 2 * parts[0].shape[1]))
        np.concatenate(parts, axis=1, out=gate_up)
        return gate_up

    def __call__(self, x: np.ndarray) -> np.ndarray:
        gate_up = self._gate_up(x)
        hidden = scratch.reused("mlp.hidden", (x.shape[0], gate_up.shape[1] // 2))
        norm = self.sub_norm
        weight, eps = (norm.weight, norm.eps) if norm is not None else (_NO_NORM, np.float32(0.0))
        float_kernels.for_rows(x.shape[0]).gated_activation(
            gate_up, self.activation == "silu", weight, eps, norm is not None, hidden
        )
        return self.down_proj(hidden)

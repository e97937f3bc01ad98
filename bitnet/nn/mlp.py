"""The gated feed-forward block: ``down(sub_norm(act(gate(x)) * up(x)))``, ``act`` relu2 or silu."""

from __future__ import annotations

import numpy as np

from .. import errors
from ..kernels import rows
from . import checks, scratch
from .changes import Tracked
from .linear import BitLinear
from .norm import RMSNorm

ACTIVATIONS = ("relu2", "silu")
_NO_NORM = np.ones(1, np.float32)  # the kernel's weight argument when there is no sub-norm


class MLP(Tracked):
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
        if not all(isinstance(p, BitLinear) for p in (gate_proj, up_proj, down_proj)):
            raise errors.DTypeError("the gate, up and down projections must be BitLinear layers")
        hidden, inner = gate_proj.in_features, gate_proj.out_features
        for name, proj, shape in (("up_proj", up_proj, (inner, hidden)), ("down_proj", down_proj, (hidden, inner))):
            if (proj.out_features, proj.in_features) != shape:
                raise errors.ShapeError(f"{name} is {proj.out_features}x{proj.in_features}; with a {inner}x{hidden} "
                                        f"gate_proj it must be {shape[0]}x{shape[1]}")
        if sub_norm is not None and (not isinstance(sub_norm, RMSNorm) or sub_norm.weight.shape != (inner,)):
            raise errors.ShapeError(f"the FFN sub-norm must be an RMSNorm over the MLP's {inner} features")
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
            return self.gate_up_proj._forward(x)
        parts = [proj._forward(x) for proj in self.projections]
        gate_up = scratch.reused("mlp.gate_up", (x.shape[0], 2 * parts[0].shape[1]))
        np.concatenate(parts, axis=1, out=gate_up)
        return gate_up

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x`` of shape ``(n, hidden)`` float32 -> ``(n, hidden)`` float32 step temporary."""
        checks.check_rows(x, "MLP input", self.down_proj.out_features)
        return self._forward(x)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """``self(x)`` for an ``x`` the caller has checked (see ``BitLinear._forward``)."""
        gate_up = self._gate_up(x)
        hidden = scratch.reused("mlp.hidden", (x.shape[0], gate_up.shape[1] // 2))
        norm = self.sub_norm
        weight, eps = (norm.weight, norm.eps) if norm is not None else (_NO_NORM, np.float32(0.0))
        rows.for_rows(x.shape[0]).gated_activation(
            gate_up, self.activation == "silu", weight, eps, norm is not None, hidden
        )
        return self.down_proj._forward(hidden)

"""The gated feed-forward block: ``down(sub_norm(act(gate(x)) * up(x)))``, ``act`` relu2 or silu."""

from __future__ import annotations

import numpy as np

from .. import errors
from ..kernels import rows
from . import checks, scratch
from .changes import Tracked
from .linear import BitLinear, check_projection
from .norm import RMSNorm, check_norm

ACTIVATIONS = ("relu2", "silu")
NO_NORM = np.ones(1, np.float32)  # the kernels' gain argument where a layer has no sub-norm (the compiled layers too)


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
        self.projections = (gate_proj, up_proj)
        self.down_proj = down_proj
        self.sub_norm = sub_norm
        self.activation = activation
        self.gate_up_proj = None
        self.check()
        try:
            self.gate_up_proj = BitLinear.stacked([gate_proj, up_proj])
            self.gate_up_proj.tag = "mlp.gate_up_proj"
        except errors.InvalidValueError:
            self.gate_up_proj = None
        for name, proj in zip(("gate_proj", "up_proj", "down_proj"), (gate_proj, up_proj, down_proj), strict=True):
            proj.tag = f"mlp.{name}"

    def check(self, hidden: int | None = None) -> None:
        """Raise unless this MLP can run over ``hidden`` features (its gate's input, when None): a known
        activation, projections whose shapes agree (the stacked gate/up one too) and a sub-norm over
        the intermediate features or None. The kernels check none of it, and a user may have
        assigned any of it since construction.
        """
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise errors.unknown_name("MLP activation", self.activation, ACTIVATIONS, errors.ConfigError)
        if not (isinstance(self.projections, tuple) and len(self.projections) == 2):
            raise errors.DTypeError("the MLP's projections must be a tuple (gate_proj, up_proj)")
        gate = self.projections[0]
        if not isinstance(gate, BitLinear):
            raise errors.DTypeError(f"gate_proj must be a BitLinear layer, got {type(gate).__name__}")
        inner, hidden = gate.out_features, gate.in_features if hidden is None else hidden
        why = f"a {inner}-feature MLP over {hidden} features"
        for name, proj, shape in (("gate_proj", gate, (inner, hidden)),
                                  ("up_proj", self.projections[1], (inner, hidden)),
                                  ("down_proj", self.down_proj, (hidden, inner))):
            check_projection(proj, shape, name, why)
        if self.gate_up_proj is not None:
            check_projection(self.gate_up_proj, (2 * inner, hidden), "gate_up_proj", why)
        check_norm(self.sub_norm, inner, "the FFN sub-norm", optional=True)

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
        self.check()
        checks.check_rows(x, "MLP input", self.down_proj.out_features)
        return self._forward(x)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """``self(x)`` for an ``x`` the caller has checked (see ``BitLinear._forward``)."""
        gate_up = self._gate_up(x)
        hidden = scratch.reused("mlp.hidden", (x.shape[0], gate_up.shape[1] // 2))
        norm = self.sub_norm
        weight, eps = (norm.weight, norm.eps) if norm is not None else (NO_NORM, np.float32(0.0))
        rows.for_rows(x.shape[0]).gated_activation(
            gate_up, self.activation == "silu", weight, eps, norm is not None, hidden
        )
        return self.down_proj._forward(hidden)

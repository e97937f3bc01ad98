"""The BitNet feed-forward block: ``down(ffn_sub_norm(relu(gate(x))^2 * up(x)))``."""

from __future__ import annotations

import numpy as np

from .. import errors
from . import float_kernels, scratch
from .linear import BitLinear
from .norm import RMSNorm


class MLP:
    """Gated ``relu2`` MLP with the BitNet ``ffn_sub_norm`` before the down projection.

    Parameters
    ----------
    gate_proj, up_proj : BitLinear ``hidden -> intermediate``.
    down_proj : BitLinear ``intermediate -> hidden``.
    sub_norm : RMSNorm over ``intermediate``.
    """

    def __init__(self, gate_proj: BitLinear, up_proj: BitLinear, down_proj: BitLinear, sub_norm: RMSNorm) -> None:
        self.projections = (gate_proj, up_proj)
        self.down_proj = down_proj
        self.sub_norm = sub_norm
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
        float_kernels.for_rows(x.shape[0]).relu2_gate_rms_norm(gate_up, self.sub_norm.weight, self.sub_norm.eps, hidden)
        return self.down_proj(hidden)

"""The BitNet feed-forward block: ``down(ffn_sub_norm(relu(gate(x))^2 * up(x)))``."""

from __future__ import annotations

import numpy as np

from .. import errors
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
        except errors.InvalidValueError:
            self.gate_up_proj = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            width = gate_up.shape[1] // 2
            gate, up = gate_up[:, :width], gate_up[:, width:]
        else:
            gate, up = (proj(x) for proj in self.projections)
        np.maximum(gate, 0.0, out=gate)
        gate *= gate
        gate *= up
        return self.down_proj(self.sub_norm(gate))

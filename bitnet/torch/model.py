"""The BitNet b1.58 model in PyTorch: transformers' ``BitNetForCausalLM`` with QAT :class:`BitLinear` projections.

The architecture is transformers' own (relu2 MLP, attention and FFN sub-norms, GQA, rope,
tied or untied head), so a checkpoint exported from it loads in transformers unchanged;
only its ``nn.Linear`` projections are swapped for :class:`~bitnet.torch.BitLinear`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import errors
from ..io.hf import read_config, read_weights
from ..models import BitNetConfig
from ..quant import TernaryTensor
from .linear import replace_linear


def _transformers():
    try:
        import transformers
    except ImportError:
        raise errors.ConfigError(
            'the torch BitNet model needs transformers: pip install "bitnet-numba[train]"'
        ) from None
    return transformers


def hf_config(config: BitNetConfig):
    """transformers' ``BitNetConfig`` for a :class:`bitnet.BitNetConfig` (without ``quantization_config``)."""
    values = config.to_dict()
    values.pop("quantization_config")
    values.pop("architectures")
    return _transformers().BitNetConfig(**values)


def build_model(config: BitNetConfig, granularity: str = "tensor", seed: int | None = None):
    """A new, randomly initialised BitNet b1.58 model for quantization-aware training.

    Parameters
    ----------
    config : the architecture (``bn.BitNetConfig``).
    granularity : weight scale granularity of the projections, "tensor" or "channel".
    seed : seed of the initialisation (``torch.manual_seed``); None keeps torch's global RNG.

    Returns
    -------
    transformers ``BitNetForCausalLM`` whose projections are :class:`~bitnet.torch.BitLinear`.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = _transformers().BitNetForCausalLM(hf_config(config))
    return replace_linear(model, granularity=granularity)


def bitnet_config(model) -> BitNetConfig:
    """The :class:`bitnet.BitNetConfig` of a torch BitNet model."""
    return BitNetConfig.from_dict(model.config.to_dict())


def from_pretrained(path: str | Path, granularity: str = "tensor"):
    """Load an HF BitNet checkpoint (packed or float) into a torch model to go on training.

    Packed projections come back as latent float weights ``codes x scale / mean|codes|``:
    ``codes x scale`` stretched by one factor per tensor so that absmean ternarization gives
    back exactly the checkpoint's codes and (to float32 rounding) its scale, and the
    quantized forward starts where the checkpoint is. Float checkpoints keep their weights.

    Raises
    ------
    CheckpointNotFoundError, ConfigError, CheckpointError: as :func:`bitnet.load_pretrained`.
    """
    config = read_config(path)
    model = build_model(config, granularity)
    weights = read_weights(path, config)
    state = model.state_dict()
    for name in state:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weight = weights[name]
        if isinstance(weight, TernaryTensor):
            density = max(float(np.abs(weight.codes).mean(dtype=np.float64)), 1e-12)
            weight = weight.codes.astype(np.float32) * np.float32(weight.scale / density)
        state[name] = torch.from_numpy(weight)
    model.load_state_dict(state)
    return model

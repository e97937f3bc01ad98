"""From a trained torch model to bitnet's model and every file format the engines read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import errors
from ..formats import pack
from ..io.atomic import replacing
from ..io.hf import save_pretrained
from ..io.tokenizer import TOKENIZER_FILE
from ..models import BitNetForCausalLM
from ..nn import BitLinear as NumpyBitLinear
from ..ops import WEIGHT_FORMAT
from ..quant import TernaryTensor
from .linear import BitLinear
from .model import bitnet_config


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def to_bitnet(model, head_dtype: str = "f32") -> BitNetForCausalLM:
    """The trained torch BitNet model as a :class:`bitnet.BitNetForCausalLM` running on bitnet's kernels.

    Each :class:`~bitnet.torch.BitLinear` is ternarized exactly as its forward does it (same
    codes, same float32 scale); norms and embeddings are copied as float32 (``head_dtype``
    chooses the embedding storage, see :meth:`bitnet.BitNetForCausalLM.from_weights`).

    Raises
    ------
    ConfigError when a projection of the model is not a BitLinear (a float model: call
    ``replace_linear`` first).
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    weights: dict[str, object] = {}
    for name, module in model.named_modules():
        if name.endswith("_proj"):
            if not isinstance(module, BitLinear):
                raise errors.ConfigError(
                    f"{name} is a {type(module).__name__}, not a bitnet.torch.BitLinear: only quantization-aware "
                    f"models can be exported (use bitnet.torch.replace_linear)"
                )
            codes, scale = module.ternary()
            ternary = TernaryTensor(codes.numpy(), scale.numpy().astype(np.float32), module.granularity)
            bias = None if module.bias is None else _numpy(module.bias)
            weights[name] = NumpyBitLinear(pack(ternary, WEIGHT_FORMAT), bias)
    for name, tensor in model.state_dict().items():
        if not name.rpartition(".")[0].endswith("_proj"):
            weights[name] = _numpy(tensor)
    return BitNetForCausalLM.from_weights(bitnet_config(model), weights, head_dtype)


def export_pretrained(model, path: str | Path, tokenizer=None) -> Path:
    """Write a trained torch BitNet model as an HF packed checkpoint directory.

    The directory holds ``config.json`` (with ``quantization_config``), ``model.safetensors``
    (uint8 packed projections + ``weight_scale``) and, given a ``tokenizers.Tokenizer``,
    ``tokenizer.json``: what :func:`bitnet.load_pretrained`, transformers and
    :func:`bitnet.save_gguf` read as they are.

    Returns
    -------
    The directory's ``Path``.

    Raises
    ------
    FormatError for per-channel weight scales, which the HF layout cannot hold (export
    them with ``bitnet.save_gguf(to_bitnet(model), path, "tq2_0")``); ConfigError as
    :func:`to_bitnet`.
    """
    numpy_model = to_bitnet(model)
    for name, linear in numpy_model.named_linears():
        if linear.weight.granularity != "tensor":
            raise errors.FormatError(
                f"{name} has per-channel weight scales, which HF packed checkpoints cannot hold (one weight_scale "
                f"per tensor): export with bitnet.save_gguf(to_bitnet(model), path, 'tq2_0' or 'tq1_0')"
            )
    path = Path(path)
    save_pretrained(numpy_model, path)
    if tokenizer is not None:
        with replacing(path / TOKENIZER_FILE) as (temporary,):
            tokenizer.save(str(temporary))
    return path

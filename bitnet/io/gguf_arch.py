"""GGUF architecture names and the one network each stands for: the only place that decides.

* ``bitnet``: llama.cpp's ``LLM_ARCH_BITNET`` (and bitnet.cpp's): 1bitLLM bitnet_b1_58, a
  SiLU-gated MLP with attention/FFN sub-norms.
* ``bitnet-b1.58`` (bitnet.cpp's ``convert-hf-to-gguf-bitnet.py``) and ``bitnet-25`` (its
  ``convert-ms-to-gguf-bitnet.py``): BitNet b1.58 2B4T, a relu2 MLP with sub-norms.
* ``llama`` (llama.cpp and bitnet.cpp): the Llama-architecture ternary models (HF1BitLLM,
  Falcon3-1.58bit, Falcon-E): SiLU, no sub-norms, and q/k rows permuted for llama.cpp's
  interleaved rope, as its converter stores every Llama.

Upstream llama.cpp has no relu2 BitNet graph: a 2B4T file is written as ``bitnet-b1.58``,
which only bitnet.cpp runs. A ``llama`` file is a ternary model only when its projections
have ternary types; a file whose sub-norm tensors disagree with its name is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import errors
from ..models import BitNetConfig
from ..models.config import LLAMA, MODEL_TYPE

SUB_NORM_TENSORS = ("attn_sub_norm", "ffn_sub_norm")


@dataclass(frozen=True)
class Network:
    """What an architecture name means for the forward pass, and the HF ``model_type`` of that family."""

    hidden_act: str
    sub_norms: bool
    model_type: str


NETWORKS = {
    "bitnet": Network("silu", True, LLAMA),
    "bitnet-b1.58": Network("relu2", True, MODEL_TYPE),
    "bitnet-25": Network("relu2", True, MODEL_TYPE),
    "llama": Network("silu", False, LLAMA),
}


def architecture_for(config: BitNetConfig) -> str:
    """The GGUF name whose graph computes ``config``'s network (bitnet.cpp's name where llama.cpp has none)."""
    for name, network in NETWORKS.items():
        if (network.hidden_act, network.sub_norms) == (config.hidden_act, config.sub_norms):
            return name
    raise errors.GGUFError(
        f"no GGUF architecture computes a {config.hidden_act} MLP {'with' if config.sub_norms else 'without'} "
        f"sub-norms: such a model cannot be written as GGUF"
    )


def network_of(architecture: str, tensor_names: set[str], ternary: bool) -> Network:
    """The network a file of ``architecture`` with these tensors holds; GGUFError when it cannot be told."""
    network = NETWORKS.get(architecture)
    if network is None:
        raise errors.GGUFError(
            f"architecture {architecture!r} is not a ternary model this library runs; supported: "
            f"{', '.join(NETWORKS)}"
        )
    has_sub_norms = any(f"blk.0.{name}.weight" in tensor_names for name in SUB_NORM_TENSORS)
    if has_sub_norms != network.sub_norms:
        raise errors.GGUFError(
            f"the file says {architecture!r}, a network {'with' if network.sub_norms else 'without'} attention/FFN "
            f"sub-norms, but its tensors {'include' if has_sub_norms else 'lack'} them: it is mislabeled, and which "
            f"network it holds cannot be told"
        )
    if architecture == "llama" and not ternary:
        raise errors.GGUFError(
            "a 'llama' file whose projections are not TQ1_0, TQ2_0 or I2_S is a float Llama, not a ternary model"
        )
    return network

"""Models built from ``bitnet.nn`` layers: the BitNet b1.58 causal LM, its config and sampling."""

from .bitnet import BitNetForCausalLM, DecoderLayer
from .config import BitNetConfig
from .random import random_model
from .sampling import Sampler

__all__ = ["BitNetConfig", "BitNetForCausalLM", "DecoderLayer", "Sampler", "random_model"]

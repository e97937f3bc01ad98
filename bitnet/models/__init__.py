"""Models built from ``bitnet.nn`` layers: the BitNet b1.58 causal LM, its config, sampling, and the bundled model."""

from .bitnet import BitNetForCausalLM, DecoderLayer
from .bundled import bundled_path
from .config import BitNetConfig
from .random import random_model
from .sampling import Sampler

__all__ = ["BitNetConfig", "BitNetForCausalLM", "DecoderLayer", "Sampler", "bundled_path", "random_model"]

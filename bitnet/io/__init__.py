"""Reading and writing models: HF checkpoints (``load_pretrained``, ``save_pretrained``) and tokenizers."""

from .hf import load_pretrained, read_config, save_pretrained
from .tokenizer import load_tokenizer

__all__ = ["load_pretrained", "load_tokenizer", "read_config", "save_pretrained"]

"""Reading and writing models: HF checkpoints (``load_pretrained``, ``save_pretrained``), GGUF files
(``load_gguf``, ``save_gguf``) and tokenizers."""

from .gguf import load_gguf, load_gguf_tokenizer, save_gguf
from .hf import load_pretrained, read_config, read_generation_config, read_weights, save_pretrained
from .tokenizer import load_tokenizer

__all__ = [
    "load_gguf", "load_gguf_tokenizer", "load_pretrained", "load_tokenizer", "read_config", "read_generation_config",
    "read_weights", "save_gguf",
    "save_pretrained",
]

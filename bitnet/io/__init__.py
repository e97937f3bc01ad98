"""Reading and writing models: HF checkpoints (``load_pretrained``, ``save_pretrained``), GGUF files
(``load_gguf``, ``save_gguf``), tokenizers, conversion between them (``convert_checkpoint``) and
what a file holds (``describe``)."""

from .convert import convert_checkpoint
from .gguf import load_gguf, load_gguf_tokenizer, save_gguf
from .hf import load_pretrained, read_config, read_generation_config, read_weights, save_pretrained
from .info import describe, read_chat_template
from .tokenizer import load_tokenizer

__all__ = [
    "convert_checkpoint", "describe", "load_gguf", "load_gguf_tokenizer", "load_pretrained", "load_tokenizer",
    "read_chat_template", "read_config", "read_generation_config", "read_weights", "save_gguf", "save_pretrained",
]

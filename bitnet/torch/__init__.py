"""``bitnet.torch``: quantization-aware training in PyTorch (extra ``[train]``; nothing else imports torch).

- :class:`BitLinear`, :func:`replace_linear`, :func:`set_quantization`: QAT layers for any torch model.
- :func:`build_model`, :func:`from_pretrained`: the BitNet b1.58 model (transformers' architecture).
- :func:`export_pretrained`, :func:`to_bitnet`: to the HF packed layout and to bitnet's own model (then GGUF).
- :func:`train`, :class:`TrainConfig`: the training loop behind ``python -m bitnet train``.

Names load on first use, so ``bitnet.torch.config`` (the CLI's options) needs no torch.
"""


from .._lazy import lazy_names

_HOMES = {
    "BitLinear": "linear", "replace_linear": "linear", "set_quantization": "linear",
    "build_model": "model", "from_pretrained": "model",
    "export_pretrained": "export", "to_bitnet": "export",
    "TrainConfig": "config", "learning_rate": "config",
    "TrainResult": "training", "evaluate": "training", "read_log": "training", "train": "training",
    "read_corpus": "corpus", "train_tokenizer": "corpus",
}

__all__ = sorted(_HOMES)


__getattr__, __dir__ = lazy_names(__name__, _HOMES)

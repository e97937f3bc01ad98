"""What a model file holds, read from its headers: ``python -m bitnet info``.

:func:`describe` reads the GGUF header and tensor table (:class:`bitnet.io.gguf.GGUFFile`)
or ``config.json`` and the safetensors headers, never building the model. The only tensor
data it touches are the projection scales: a ``weight_scale`` value per HF projection, the
I2_S tail, and the fp16 block scales of TQ payloads (two bytes per block, which still reads
through every page of those tensors).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .. import errors
from ..formats import i2_s as i2_s_format
from ..models import bundled_path
from . import gguf, gguf_arch, gguf_tokenizer, hf, tokenizer

# Tensor roles, in the order they are listed.
ROLES = ("projection", "projection scale", "bias", "norm", "embedding", "head", "other")
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers versions save the template
GGUF_CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of the HF model directory or ``.gguf`` file ``path``.

    Returns
    -------
    dict with ``path``; ``kind`` ("hf" or "gguf"); ``file_size`` (bytes; an HF directory's
    files together); ``architecture`` (``model_type``, ``gguf_architecture``: the file's name,
    or the one :func:`bitnet.save_gguf` would write, ``hidden_act``, ``sub_norms``, the
    shapes, ``context``, ``tied_embeddings``); ``parameters``; ``bits_per_parameter`` (file
    bits per parameter); ``projections`` (``formats``: tensor count per format, ``weights``,
    ``bits_per_weight`` of their payloads, ``scale_min``/``scale_max``: the range of the
    scales the ternary codes multiply by, None for float projections); ``tensors``
    (``count``, ``formats``: per role a count per format, ``list``: name, role, format and
    shape of each); ``tokenizer`` (``present``, ``kind``, ``vocab_size``, ``chat_template``).

    Raises
    ------
    CheckpointNotFoundError when ``path`` does not exist; the loaders' errors
    (CheckpointError, ConfigError, GGUFError) when it is unreadable.
    """
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return _describe_gguf(path)
    if not path.is_dir():
        raise errors.CheckpointNotFoundError(f"model directory {path} does not exist")
    return _describe_hf(path)


def read_chat_template(path: str | Path | None = None) -> str | None:
    """The Jinja chat template of a model (``tokenizer_config.json``, ``chat_template.jinja`` or
    GGUF ``tokenizer.chat_template``); None when it has none. None: the bundled model."""
    path = bundled_path() if path is None else Path(path)
    if path.suffix.lower() == ".gguf":
        file = gguf.GGUFFile(path)
        return file.value(GGUF_CHAT_TEMPLATE_KEY, (_gguf_string_type(),), None)
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_text()
    settings = hf.read_json(path / TOKENIZER_CONFIG_FILE)
    template = settings.get("chat_template") if isinstance(settings, dict) else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _gguf_string_type() -> int:
    return int(gguf._gguf().GGUFValueType.STRING)


def _architecture(config, gguf_architecture: str | None) -> dict[str, Any]:
    if gguf_architecture is None:
        try:
            gguf_architecture = gguf_arch.architecture_for(config)
        except errors.GGUFError:  # a network no GGUF graph computes
            gguf_architecture = None
    return {
        "model_type": config.model_type, "hf_architecture": config.default_architecture(),
        "gguf_architecture": gguf_architecture, "hidden_act": config.hidden_act, "sub_norms": config.sub_norms,
        "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim, "vocab_size": config.vocab_size,
        "context": config.max_position_embeddings, "tied_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rope_theta,
        "rope_type": (config.rope_scaling or {}).get("rope_type", "default"),
    }


def _summary(path: Path, kind: str, file_size: int, architecture: dict, tensors: list[dict],
             scales: list[float], tokenizer_info: dict) -> dict[str, Any]:
    """The common part of both kinds, from the per-tensor records (``name``, ``role``, ``format``,
    ``shape``, ``weights``: its parameters, ``nbytes``: its stored size)."""
    projections = [t for t in tensors if t["role"] == "projection"]
    parameters = sum(t["weights"] for t in tensors)
    weights = sum(t["weights"] for t in projections)
    formats: dict[str, dict[str, int]] = {}
    for role in ROLES:
        counts = Counter(t["format"] for t in tensors if t["role"] == role)
        if counts:
            formats[role] = dict(counts)
    return {
        "path": str(path), "kind": kind, "file_size": file_size, "architecture": architecture,
        "parameters": parameters,
        "bits_per_parameter": 8 * file_size / parameters if parameters else None,
        "projections": {
            "formats": formats.get("projection", {}), "weights": weights,
            "bits_per_weight": 8 * sum(t["nbytes"] for t in projections) / weights if weights else None,
            "scale_min": min(scales) if scales else None, "scale_max": max(scales) if scales else None,
        },
        "tensors": {
            "count": len(tensors), "formats": formats,
            "list": [{key: t[key] for key in ("name", "role", "format", "shape")} for t in tensors],
        },
        "tokenizer": tokenizer_info,
    }


# ---------------------------------------------------------------------------------------
# GGUF

_GGUF_PROJECTIONS = {f"{name}.weight" for name in gguf.PROJECTIONS.values()}


def _gguf_role(name: str) -> str:
    if name == "token_embd.weight":
        return "embedding"
    if name == "output.weight":
        return "head"
    short = name.split(".", 2)[-1] if name.startswith("blk.") else name
    if short in _GGUF_PROJECTIONS:
        return "projection"
    if short.endswith(".scale"):  # llama.cpp's optional per-projection multipliers
        return "projection scale"
    if short.endswith(".bias"):
        return "bias"
    if short.endswith("norm.weight"):
        return "norm"
    return "other"


def _gguf_scales(file: gguf.GGUFFile, tensor: gguf.GGUFTensor) -> list[float]:
    """The smallest and largest scale a ternary projection's codes multiply by (none for float types)."""
    format = gguf.TERNARY_TYPES.get(tensor.type_id)
    if format is None:
        return []
    if format == "i2_s":
        values = np.array([i2_s_format.stored_scale(tensor.data)], np.float32)
    else:  # the fp16 d closing each block; blocks of zeros have d = 0 and hold no scale
        block = gguf.TQ_BLOCK_BYTES[format]
        d = np.ascontiguousarray(tensor.data.reshape(-1, block)[:, -2:]).view(np.float16).astype(np.float32)
        values = d[d > 0]
    multiplier = file.tensors.get(tensor.name.removesuffix(".weight") + ".scale")
    if multiplier is not None and multiplier.type_id == 0:  # F32
        values = values * multiplier.data.view(np.float32)[0]
    values = values[np.isfinite(values)]
    return [float(values.min()), float(values.max())] if values.size else []


def _describe_gguf(path: Path) -> dict[str, Any]:
    file = gguf.GGUFFile(path)
    config = gguf.read_config(file)
    name = file.value("general.architecture", (_gguf_string_type(),))
    tensors, scales = [], []
    for tensor in file.tensors.values():
        role = _gguf_role(tensor.name)
        tensors.append({"name": tensor.name, "role": role, "format": tensor.type_name, "shape": list(tensor.shape),
                        "weights": math.prod(tensor.shape), "nbytes": tensor.data.nbytes})
        if role == "projection":
            scales += _gguf_scales(file, tensor)
    return _summary(path, "gguf", path.stat().st_size, _architecture(config, name), tensors, scales,
                    _gguf_tokenizer(file))


def _gguf_tokenizer(file: gguf.GGUFFile) -> dict[str, Any]:
    model = file.value(gguf_tokenizer.MODEL_KEY, (_gguf_string_type(),), None)
    if model is None:
        return {"present": False}
    kinds = {gguf_tokenizer.BPE_MODEL: "byte-level BPE",
             gguf_tokenizer.SPM_MODEL: "SentencePiece (BPE with byte fallback)"}
    tokens = file.fields.get(gguf_tokenizer.TOKENS_KEY)
    pre = file.value(gguf_tokenizer.PRE_KEY, (_gguf_string_type(),), None)
    return {"present": True, "kind": kinds.get(model, model) + (f", {pre} pre-tokenizer" if pre else ""),
            "vocab_size": 0 if tokens is None else len(tokens.data),
            "chat_template": GGUF_CHAT_TEMPLATE_KEY in file.fields}


# ---------------------------------------------------------------------------------------
# HF


def _projection_shape(config, module: str) -> tuple[int, int] | None:
    """``(out, in)`` when ``module`` (``model.layers.3.self_attn.q_proj``) is a projection of ``config``, else None.

    Parsed from the name rather than looked up in a list of every layer's projections: a
    config may claim billions of layers.
    """
    parts = module.split(".", 3)
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    return config.linear_shapes().get(parts[3]) if int(parts[2]) < config.num_hidden_layers else None


def _hf_role(name: str, config) -> str:
    base, _, leaf = name.rpartition(".")
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "head"
    if _projection_shape(config, base) is not None:
        return {"weight": "projection", "weight_scale": "projection scale", "bias": "bias"}.get(leaf, "other")
    if name.endswith("norm.weight") or name.endswith("_ln.weight") or name.endswith("layernorm.weight"):
        return "norm"
    return "other"


_SAFETENSORS_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _describe_hf(path: Path) -> dict[str, Any]:
    config = hf.read_config(path)
    reader = hf._TensorReader(path)
    tensors, scales = [], []
    divide = config.linear_class == "bitlinear"
    for name in sorted(reader.names, key=_natural):
        role = _hf_role(name, config)
        dtype, shape = reader.header(name)
        count = math.prod(shape)
        packed = role == "projection" and dtype == "U8"
        weights = math.prod(_projection_shape(config, name.removesuffix(".weight"))) if packed else count
        tensors.append({"name": name, "role": role, "format": "packed 2-bit (U8)" if packed else dtype,
                        "shape": shape, "weights": 0 if role == "projection scale" else weights,
                        "nbytes": count * _SAFETENSORS_BYTES.get(dtype, 0)})
        if role == "projection scale":
            stored = np.asarray(reader.get(name), np.float32).reshape(-1)
            with np.errstate(divide="ignore"):
                values = 1 / stored if divide else stored
            scales += values[np.isfinite(values)].tolist()
    size = sum(file.stat().st_size for file in path.iterdir() if file.is_file() and not file.name.startswith("."))
    return _summary(path, "hf", size, _architecture(config, None), tensors, scales, _hf_tokenizer(path))


def _natural(name: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10`` (numbers before words where names differ in kind)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _hf_tokenizer(path: Path) -> dict[str, Any]:
    spec = hf.read_json(path / tokenizer.TOKENIZER_FILE)
    if not isinstance(spec, dict):
        return {"present": False}
    model = spec.get("model") or {}
    vocab = model.get("vocab") or {}
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))  # Unigram: a list of pairs
    ids |= {token.get("id") for token in spec.get("added_tokens") or [] if isinstance(token, dict)}
    kind = model.get("type") or "unknown"
    if kind == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        kind = "byte-level BPE"
    elif kind == "BPE" and model.get("byte_fallback"):
        kind = "SentencePiece (BPE with byte fallback)"
    return {"present": True, "kind": kind, "vocab_size": len(ids),
            "chat_template": read_chat_template(path) is not None}

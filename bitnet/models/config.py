"""The architecture hyperparameters of a BitNet b1.58 model, read from an HF ``config.json``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .. import errors
from ..nn.checks import is_int, positive_int, positive_number

MODEL_TYPE = "bitnet"
LLAMA = "llama"
ONE_BIT_LLM_ARCHITECTURE = "BitnetForCausalLM"  # 1bitLLM's remote-code class (model_type "llama")
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
ACTIVATIONS = ("relu2", "silu")
ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")  # freq_factors: a GGUF file's rope_freqs
DEFAULT_ROPE_THETA = 500000.0
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings")
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "linear_rms_norm_eps")
_BOOLS = ("tie_word_embeddings", "attention_bias", "use_rms_norm", "sub_norms")


def _of_type(config: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """``config[key]``, or ``default`` when absent or null; ConfigError when it is not a ``kind``."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise errors.ConfigError(f"{key} must be a JSON {'array' if kind is list else 'object'}, got {value!r}")
    return value


def _token_id(key: str, value: Any) -> int:
    if not is_int(value) or value < 0:
        raise errors.ConfigError(f"{key} must be a non-negative integer token id (or a list of them for "
                                 f"eos_token_id), got {value!r}; fix it in config.json")
    return int(value)


@dataclass
class BitNetConfig:
    """Shapes and constants of a ternary transformer (defaults: BitNet b1.58 2B4T, HF ``BitNetForCausalLM``).

    The model families differ only by these settings:

    ======================================  ============  ===========  ========  =========
    family                                  model_type    hidden_act   sub_norms weights
    ======================================  ============  ===========  ========  =========
    BitNet b1.58 2B4T (``BitNetForCausalLM``) ``bitnet``    ``relu2``    yes       packed
    1bitLLM bitnet_b1_58 (``BitnetForCausalLM``) ``llama``  ``silu``     yes       float
    Llama-architecture ternary, Falcon-E    ``llama`` +   ``silu``     no        packed
                                            ``quantization_config``
    ======================================  ============  ===========  ========  =========

    ``sub_norms``: BitNet's RMSNorms before ``o_proj`` and ``down_proj``. ``rope_scaling``:
    HF's rope parameters other than the default (``{"rope_type": "llama3", "factor": ...}``
    or ``"linear"``), or ``{"rope_type": "freq_factors", "freq_factors": [...]}`` for a GGUF
    file's per-frequency divisors, which ``config.json`` cannot express. ``linear_class`` says
    how a packed checkpoint's ``weight_scale`` is used ("bitlinear" divides by it,
    "autobitlinear" multiplies); ``use_rms_norm`` adds HF's
    optional RMSNorm at the input of every BitLinear. ``extra`` keeps the other
    ``config.json`` keys so that ``save_pretrained`` writes them back.
    """

    vocab_size: int = 128256
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int = 5
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = DEFAULT_ROPE_THETA
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    linear_class: str = "bitlinear"
    use_rms_norm: bool = False
    linear_rms_norm_eps: float = 1e-6
    model_type: str = MODEL_TYPE
    hidden_act: str = "relu2"
    sub_norms: bool = True
    rope_scaling: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # One validation for every source (config.json, GGUF metadata, direct construction): a
        # wrong type or range here would otherwise surface as a ZeroDivisionError, a kernel
        # reading past an array, or a NaN model.
        for key in _POSITIVE_INTS:
            setattr(self, key, positive_int(getattr(self, key), key, errors.ConfigError))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.head_dim = positive_int(self.head_dim, "head_dim", errors.ConfigError)
        if self.head_dim % 2:
            raise errors.ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise errors.ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for key in _POSITIVE_FLOATS:
            setattr(self, key, positive_number(getattr(self, key), key, errors.ConfigError))
        for key in _BOOLS:
            if not isinstance(getattr(self, key), (bool, np.bool_)):
                raise errors.ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
            setattr(self, key, bool(getattr(self, key)))
        if self.bos_token_id is not None:
            self.bos_token_id = _token_id("bos_token_id", self.bos_token_id)
        if isinstance(self.eos_token_id, (list, tuple)):
            self.eos_token_id = [_token_id("eos_token_id", value) for value in self.eos_token_id]
        elif self.eos_token_id is not None:
            self.eos_token_id = _token_id("eos_token_id", self.eos_token_id)
        if self.linear_class not in LINEAR_CLASSES:
            raise errors.unknown_name("linear_class", self.linear_class, LINEAR_CLASSES, errors.ConfigError)
        if self.hidden_act not in ACTIVATIONS:
            raise errors.unknown_name("hidden_act", self.hidden_act, ACTIVATIONS, errors.ConfigError)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise errors.ConfigError(f"rope_scaling must be a dict or None, got {self.rope_scaling!r}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise errors.unknown_name("rope type", rope_type, ROPE_TYPES, errors.ConfigError)

    @property
    def sub_norm_names(self) -> tuple[str, str]:
        """HF names of the attention and FFN sub-norms (1bitLLM calls them ``inner_attn_ln``, ``ffn_layernorm``)."""
        if self.model_type == LLAMA:
            return ("self_attn.inner_attn_ln", "mlp.ffn_layernorm")
        return ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")

    def norm_shapes(self) -> dict[str, int]:
        """Features of each RMSNorm of a decoder layer, by HF module name."""
        shapes = {"input_layernorm": self.hidden_size, "post_attention_layernorm": self.hidden_size}
        if self.sub_norms:
            attention, ffn = self.sub_norm_names
            shapes.update({attention: self.num_attention_heads * self.head_dim, ffn: self.intermediate_size})
        return shapes

    @property
    def stop_token_ids(self) -> list[int]:
        """The end-of-sequence ids generation stops at by default."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def weight_count(self) -> int:
        """How many weights :meth:`weight_shapes` yields, counted without listing them (a config may claim 2**31)."""
        per_layer = len(self.linear_shapes()) + len(self.norm_shapes())
        return self.num_hidden_layers * per_layer + 2 + (not self.tie_word_embeddings)

    def weight_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """``(HF name, shape)`` of every weight of the model (projections without ``.weight``), in checkpoint order."""
        for i in range(self.num_hidden_layers):
            yield from ((f"model.layers.{i}.{name}", shape) for name, shape in self.linear_shapes().items())
            yield from ((f"model.layers.{i}.{name}.weight", (size,)) for name, size in self.norm_shapes().items())
        yield "model.norm.weight", (self.hidden_size,)
        yield "model.embed_tokens.weight", (self.vocab_size, self.hidden_size)
        if not self.tie_word_embeddings:
            yield "lm_head.weight", (self.vocab_size, self.hidden_size)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(out_features, in_features)`` of each projection of a decoder layer, by HF module name."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BitNetConfig:
        """Read an HF ``config.json`` dict of any supported family; ConfigError for anything else."""
        if not isinstance(config, dict):
            raise errors.ConfigError(f"config.json must hold a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type")
        architectures = _of_type(config, "architectures", list, [])
        quant = _of_type(config, "quantization_config", dict, {})
        if model_type == MODEL_TYPE:
            family = {"hidden_act": config.get("hidden_act") or "relu2", "sub_norms": True}
        elif model_type == LLAMA and ONE_BIT_LLM_ARCHITECTURE in architectures:
            family = {"hidden_act": config.get("hidden_act") or "silu", "sub_norms": True}
        elif model_type == LLAMA and quant.get("quant_method") == "bitnet":
            family = {"hidden_act": config.get("hidden_act") or "silu", "sub_norms": False}
        elif model_type == LLAMA:
            raise errors.ConfigError(
                "this Llama checkpoint is not ternary: it has no bitnet quantization_config and is not a 1bitLLM "
                "BitnetForCausalLM model"
            )
        else:
            raise errors.ConfigError(
                f"unsupported model_type {model_type!r}: the ternary families are {MODEL_TYPE!r} (BitNetForCausalLM), "
                f"and {LLAMA!r} with a bitnet quantization_config or 1bitLLM's {ONE_BIT_LLM_ARCHITECTURE}"
            )
        rope = dict(_of_type(config, "rope_parameters", dict, None) or _of_type(config, "rope_scaling", dict, {}))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope_theta = rope.pop("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
        if rope_type not in ROPE_TYPES:
            raise errors.ConfigError(
                f"unsupported rope type {rope_type!r}: the rotary embeddings implemented are {', '.join(ROPE_TYPES)}"
            )
        derived = ("extra", "rope_theta", "linear_class", "model_type", "hidden_act", "sub_norms", "rope_scaling")
        known = {f for f in cls.__dataclass_fields__ if f not in derived}
        values = {key: config[key] for key in known if config.get(key) is not None}
        values.update(family, model_type=model_type, rope_theta=rope_theta)
        values["rope_scaling"] = {"rope_type": rope_type, **rope} if rope_type != "default" else None
        values["linear_class"] = quant.get("linear_class", "bitlinear")
        values["use_rms_norm"] = quant.get("use_rms_norm", False)
        values["linear_rms_norm_eps"] = quant.get("rms_norm_eps") or 1e-6
        values["extra"] = {key: value for key, value in config.items() if key not in known and key != "hidden_act"}
        if config.get("num_key_value_heads") is None and "num_attention_heads" in config:
            values["num_key_value_heads"] = config["num_attention_heads"]  # HF: no GQA unless said
        values["bos_token_id"] = config.get("bos_token_id")
        values["eos_token_id"] = config.get("eos_token_id")
        values["tie_word_embeddings"] = config.get("tie_word_embeddings", False)
        return cls(**values)

    def default_architecture(self) -> str:
        """The HF class name of this family."""
        if self.model_type == MODEL_TYPE:
            return "BitNetForCausalLM"
        return ONE_BIT_LLM_ARCHITECTURE if self.sub_norms else "LlamaForCausalLM"

    def to_dict(self) -> dict[str, Any]:
        """An HF ``config.json`` dict for a packed checkpoint (``quant_method: "bitnet"``)."""
        if (self.rope_scaling or {}).get("rope_type") == "freq_factors":
            raise errors.ConfigError(
                "this model's rope frequencies come from a GGUF rope_freqs tensor, which config.json cannot express: "
                "save it with bn.save_gguf"
            )
        values = asdict(self)
        extra = values.pop("extra")
        for key in ("rope_theta", "linear_class", "use_rms_norm", "linear_rms_norm_eps", "model_type", "sub_norms",
                    "rope_scaling"):
            values.pop(key)
        config = {"architectures": [self.default_architecture()], **extra, **values, "model_type": self.model_type}
        config.pop("rope_scaling", None)
        config["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        config["rope_theta"] = self.rope_theta
        quant = dict(extra.get("quantization_config") or {})
        quant.update(quant_method="bitnet", linear_class=self.linear_class, quantization_mode="offline",
                     use_rms_norm=self.use_rms_norm, rms_norm_eps=self.linear_rms_norm_eps)
        config["quantization_config"] = quant
        return config

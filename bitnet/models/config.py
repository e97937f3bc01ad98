"""The architecture hyperparameters of a BitNet b1.58 model, read from an HF ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .. import errors

MODEL_TYPE = "bitnet"
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
DEFAULT_ROPE_THETA = 500000.0


@dataclass
class BitNetConfig:
    """Shapes and constants of HF ``BitNetForCausalLM`` (defaults: BitNet b1.58 2B4T).

    ``linear_class`` says how a packed checkpoint's ``weight_scale`` is used ("bitlinear"
    divides by it, "autobitlinear" multiplies); ``use_rms_norm`` adds HF's optional RMSNorm
    at the input of every BitLinear. ``extra`` keeps the other ``config.json`` keys so that
    ``save_pretrained`` writes them back.
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
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise errors.ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_class not in LINEAR_CLASSES:
            raise errors.unknown_name("linear_class", self.linear_class, LINEAR_CLASSES, errors.ConfigError)

    @property
    def stop_token_ids(self) -> list[int]:
        """The end-of-sequence ids generation stops at by default."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(out_features, in_features)`` of each projection of a decoder layer, by HF module name."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BitNetConfig:
        """Read an HF ``config.json`` dict; ConfigError for another ``model_type`` or a rope type we lack."""
        model_type = config.get("model_type")
        if model_type != MODEL_TYPE:
            raise errors.ConfigError(
                f"unsupported model_type {model_type!r}: only {MODEL_TYPE!r} (BitNetForCausalLM) models can be loaded"
            )
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise errors.ConfigError(
                f"unsupported rope type {rope_type!r}: only the default rotary embedding is implemented"
            )
        quant = config.get("quantization_config") or {}
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "rope_theta", "linear_class")}
        values = {key: config[key] for key in known if config.get(key) is not None}
        values["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA)))
        values["linear_class"] = quant.get("linear_class", "bitlinear")
        values["use_rms_norm"] = bool(quant.get("use_rms_norm", False))
        values["linear_rms_norm_eps"] = float(quant.get("rms_norm_eps") or 1e-6)
        values["extra"] = {key: value for key, value in config.items() if key not in known}
        if config.get("num_key_value_heads") is None and "num_attention_heads" in config:
            values["num_key_value_heads"] = config["num_attention_heads"]  # HF: no GQA unless said
        values["bos_token_id"] = config.get("bos_token_id")
        values["eos_token_id"] = config.get("eos_token_id")
        values["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """An HF ``config.json`` dict for a packed checkpoint (``quant_method: "bitnet"``)."""
        values = asdict(self)
        extra = values.pop("extra")
        for key in ("rope_theta", "linear_class", "use_rms_norm", "linear_rms_norm_eps"):
            values.pop(key)
        config = {"architectures": ["BitNetForCausalLM"], **extra, **values, "model_type": MODEL_TYPE}
        config.pop("rope_scaling", None)
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        config["rope_theta"] = self.rope_theta
        quant = dict(extra.get("quantization_config") or {})
        quant.update(quant_method="bitnet", linear_class=self.linear_class, quantization_mode="offline",
                     use_rms_norm=self.use_rms_norm, rms_norm_eps=self.linear_rms_norm_eps)
        config["quantization_config"] = quant
        return config

"""Settings of a training run and its learning-rate schedule (plain Python: the CLI reads them without torch).

Schedule (BitNet b1.58's two stages): linear warm-up to ``peak_lr``, then linear decay to
half of it at mid-training; there the cool-down starts at ``cooldown_lr`` x ``peak_lr`` and
decays linearly to 0, with weight decay switched off.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import errors
from ..models import BitNetConfig

BLOCK = 256  # ggml's TQ1_0/TQ2_0 block: hidden and intermediate sizes are multiples of it


@dataclass
class TrainConfig:
    """Everything a training run depends on; the run is deterministic given it (and the thread count).

    Sizes: ``hidden_size`` and ``intermediate_size`` must be multiples of 256 so that every
    format (TQ1_0/TQ2_0 included) holds the model. ``batch_size`` is the global number of
    sequences of ``context`` tokens per step. ``quantize=False`` trains the float baseline
    of the same shape; ``progressive_steps`` ramps the quantization strength from 0 to 1.
    """

    out_dir: str
    corpus: str = "stdlib"
    pattern: str = "*.txt"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    context: int = 256
    batch_size: int = 32
    steps: int = 1300
    peak_lr: float = 3e-3
    cooldown_lr: float = 0.2
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    quantize: bool = True
    granularity: str = "tensor"
    progressive_steps: int = 0
    eval_every: int = 0
    checkpoint_every: int = 200
    bf16: bool | None = None
    compile: bool = True

    def model_config(self) -> BitNetConfig:
        """The :class:`bitnet.BitNetConfig` of the model; ConfigError for sizes the formats cannot hold."""
        for name in ("hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if value <= 0 or value % BLOCK:
                raise errors.ConfigError(
                    f"{name} = {value}: it must be a positive multiple of {BLOCK} so that every format "
                    f"(TQ1_0/TQ2_0 blocks of {BLOCK}) can hold the model"
                )
        if self.num_heads <= 0 or self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise errors.ConfigError(
                f"num_heads = {self.num_heads} must divide hidden_size ({self.hidden_size}) into an even head size"
            )
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise errors.ConfigError(f"num_kv_heads = {self.num_kv_heads} must divide num_heads ({self.num_heads})")
        for name in ("num_layers", "context", "batch_size", "steps"):
            if getattr(self, name) <= 0:
                raise errors.ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size < 257:
            raise errors.ConfigError(f"vocab_size = {self.vocab_size}: byte-level BPE needs at least 257 tokens")
        return BitNetConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, max_position_embeddings=self.context, rope_theta=10000.0,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=0,
        )


def learning_rate(step: int, config: TrainConfig) -> tuple[float, float]:
    """``(learning rate, weight decay)`` at ``step`` (0-based) of the two-stage schedule."""
    c = config
    half = c.steps // 2
    if step < min(c.warmup_steps, half):
        return c.peak_lr * (step + 1) / c.warmup_steps, c.weight_decay
    if step < half:
        done = (step - c.warmup_steps) / max(1, half - c.warmup_steps)
        return c.peak_lr * (1.0 - 0.5 * done), c.weight_decay
    done = (step - half) / max(1, c.steps - half)
    return c.peak_lr * c.cooldown_lr * (1.0 - done), 0.0

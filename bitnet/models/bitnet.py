"""``BitNetForCausalLM``: every ternary transformer family, in one page of numpy.

    x = embed(ids)
    for layer in layers:
        x = x + o_proj(attn_sub_norm(attention(rope(q, k, v of input_layernorm(x)))))
        x = x + down_proj(ffn_sub_norm(act(gate(h)) * up(h)))   with h = post_attention_layernorm(x)
    logits = lm_head(norm(x))

``act`` is relu2 (BitNet b1.58 2B4T) or silu (1bitLLM, Llama-architecture ternary); the
sub-norms exist in the BitNet families only (``config.sub_norms``). Every projection is a
:class:`bitnet.nn.BitLinear`; float math (norms, rope, softmax) is float32, as transformers
computes a float32 model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from .. import errors
from ..nn import MLP, Attention, BitLinear, Embedding, KVCache, RMSNorm, RotaryEmbedding, scratch
from .config import BitNetConfig
from .sampling import Sampler


class DecoderLayer:
    """Pre-norm attention and MLP blocks, each added to the residual stream."""

    def __init__(self, attention: Attention, mlp: MLP, input_norm: RMSNorm, post_attention_norm: RMSNorm) -> None:
        self.attention = attention
        self.mlp = mlp
        self.input_norm = input_norm
        self.post_attention_norm = post_attention_norm

    def __call__(self, x: np.ndarray, cache: KVCache, index: int) -> None:
        """Update the residual stream ``x`` (``(n, hidden)``) in place."""
        attended = self.attention(self.input_norm(x), cache, index)
        x += self.mlp(self.post_attention_norm.add_and_normalize(x, attended))


def build_layers(config: BitNetConfig, weights: dict[str, object]) -> tuple[list[DecoderLayer], RMSNorm]:
    """The decoder layers and final norm from HF-named weights (see :meth:`BitNetForCausalLM.from_weights`)."""
    c = config
    rope = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling)
    attention_sub_norm, ffn_sub_norm = c.sub_norm_names

    def norm(name: str) -> RMSNorm:
        # The tag names the role, shared by all layers: "self_attn.attn_sub_norm.weight", ...
        role = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        return RMSNorm(weights[name], c.rms_norm_eps, tag=role)

    def sub_norm(name: str) -> RMSNorm | None:
        return norm(name) if c.sub_norms else None

    layers = []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        attention = Attention(
            *(weights[f"{p}self_attn.{n}_proj"] for n in "qkvo"),
            sub_norm(f"{p}{attention_sub_norm}.weight"),
            c.num_attention_heads, c.num_key_value_heads, c.head_dim, rope,
        )
        projections = (weights[f"{p}mlp.{n}_proj"] for n in ("gate", "up", "down"))
        mlp = MLP(*projections, sub_norm(f"{p}{ffn_sub_norm}.weight"), c.hidden_act)
        layers.append(DecoderLayer(attention, mlp, norm(f"{p}input_layernorm.weight"),
                                   norm(f"{p}post_attention_layernorm.weight")))
    return layers, norm("model.norm.weight")


class BitNetForCausalLM:
    """A BitNet b1.58 causal language model (HF ``BitNetForCausalLM``) running on ``bn.matmul``.

    Build one with :func:`bitnet.load_pretrained` (HF checkpoint directory) or
    :meth:`from_weights`; the head is the embedding table when ``config.tie_word_embeddings``.

    Parameters
    ----------
    config : the architecture.
    embed_tokens : token embedding table.
    layers : the decoder layers.
    norm : final RMSNorm.
    lm_head : the output head, or None to use ``embed_tokens`` (tied).
    """

    def __init__(
        self,
        config: BitNetConfig,
        embed_tokens: Embedding,
        layers: list[DecoderLayer],
        norm: RMSNorm,
        lm_head: Embedding | None = None,
    ) -> None:
        self.config = config
        self.embed_tokens = embed_tokens
        self.layers = layers
        self.norm = norm
        self.lm_head = embed_tokens if lm_head is None else lm_head

    @property
    def tied(self) -> bool:
        return self.lm_head is self.embed_tokens

    def new_cache(self, capacity: int = 256) -> KVCache:
        """An empty key/value cache for one sequence (it grows by doubling past ``capacity``)."""
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity)

    def forward(
        self, input_ids, cache: KVCache | None = None, last_only: bool = False, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Float32 logits for each token of ``input_ids``.

        Parameters
        ----------
        input_ids : 1-D array_like of int token ids.
        cache : continue the sequence held in this cache (its keys/values are extended);
            None runs ``input_ids`` as a whole new sequence.
        last_only : return only the last position's logits, shape ``(1, vocab_size)``.
        out : float32 array of the result's shape to write the logits into.

        Returns
        -------
        ndarray of float32, shape ``(len(input_ids), vocab_size)``.
        """
        ids = self._checked_ids(input_ids)
        if cache is None:
            cache = self.new_cache(len(ids))
        cache.reserve(cache.length + len(ids))
        with scratch.step():
            x = self.embed_tokens.rows(ids, out=scratch.empty((len(ids), self.config.hidden_size)))
            for index, layer in enumerate(self.layers):
                layer(x, cache, index)
            cache.length += len(ids)
            h = self.norm(x[-1:] if last_only else x)
            return self.lm_head.logits(h, out=out)

    __call__ = forward

    def stream(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Iterable[int] | None = None,
        first_tokens: Iterable[int] | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids one at a time (prefill once, then one cached decode step each).

        Stops after ``max_new_tokens`` or after yielding a token of ``stop`` (default: the
        config's ``eos_token_id``). Sampling arguments are those of :meth:`generate`.
        """
        ids = self._checked_ids(input_ids)
        stop_ids = set(self.config.stop_token_ids if stop is None else stop)
        sampler = Sampler(temperature, top_k, top_p, seed)
        cache = self.new_cache(len(ids) + max_new_tokens)
        logits = self.forward(ids, cache, last_only=True)
        first = logits if first_tokens is None else self._restricted(logits, first_tokens)
        step_ids = np.zeros(1, np.int64)  # the decode loop reuses these two buffers
        for produced in range(1, max_new_tokens + 1):
            token = sampler(first[0] if produced == 1 else logits[0])
            yield token
            if token in stop_ids or produced == max_new_tokens:
                return
            step_ids[0] = token
            self.forward(step_ids, cache, out=logits)

    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Iterable[int] | None = None,
        callback: Callable[[int], None] | None = None,
        first_tokens: Iterable[int] | None = None,
    ) -> list[int]:
        """Generate up to ``max_new_tokens`` token ids after ``input_ids``.

        Parameters
        ----------
        input_ids : 1-D array_like of int, the prompt.
        max_new_tokens : how many tokens to generate at most.
        temperature : 0 for greedy (argmax) decoding, else logits are divided by it and sampled.
        top_k : sample only among the ``top_k`` most likely tokens.
        top_p : sample only among the smallest set of tokens whose probability reaches ``top_p``.
        seed : seed of the sampler's random generator (reproducible sampling).
        stop : token ids that end generation (included in the output); default the config's EOS ids.
        callback : called with each token id as soon as it is generated (streaming).
        first_tokens : the ids the first generated token must be one of, e.g. for token healing
            (the prompt's last token dropped, and the tokens whose text begins with it allowed).

        Returns
        -------
        list of int: the generated ids (the prompt is not repeated).
        """
        tokens = []
        for token in self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop, first_tokens):
            tokens.append(token)
            if callback is not None:
                callback(token)
        return tokens

    def _restricted(self, logits: np.ndarray, allowed: Iterable[int]) -> np.ndarray:
        """``logits`` with every id outside ``allowed`` set to -inf."""
        allowed = self._checked_ids(np.fromiter(allowed, np.int64))
        restricted = np.full_like(logits, -np.inf)
        restricted[:, allowed] = logits[:, allowed]
        return restricted

    def _checked_ids(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise errors.ShapeError(f"input_ids must be a non-empty 1-D array of token ids, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise errors.DTypeError(f"input_ids must hold integers, got dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise errors.InvalidValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got [{ids.min()}, {ids.max()}]"
            )
        return ids.astype(np.int64)

    @classmethod
    def from_weights(
        cls, config: BitNetConfig, weights: dict[str, object], head_dtype: str = "auto"
    ) -> BitNetForCausalLM:
        """Assemble a model from HF-named weights.

        ``weights`` maps HF tensor names to a :class:`BitLinear` for projections
        (``model.layers.0.self_attn.q_proj``, ...) and float arrays for norms and embeddings
        (``model.embed_tokens.weight``, and ``lm_head.weight`` unless the head is tied).
        ``head_dtype`` is the storage of the embedding/head ("auto", "f32", "f16", "bf16", "int8").
        """
        embed = Embedding.from_weights(weights["model.embed_tokens.weight"], head_dtype)
        head = None
        if not config.tie_word_embeddings:
            head = Embedding.from_weights(weights["lm_head.weight"], head_dtype)
        layers, norm = build_layers(config, weights)
        return cls(config, embed, layers, norm, head)

    def to(self, device: str) -> BitNetForCausalLM:
        """Run every ternary projection on ``device`` ("cpu", or a backend of ``bn.devices()``).

        Each projection the forward pass calls uploads its weights once, now. Norms, rotary
        embedding, attention and the head stay on the CPU, so activations cross to the
        device and back once per projection. Raises DeviceError, with the reason, if
        ``device`` is not available. Returns the model.
        """
        for layer in self.layers:
            for linear in (*layer.attention.running_linears, *layer.mlp.running_linears):
                linear.to(device)
        return self

    def named_linears(self) -> Iterator[tuple[str, BitLinear]]:
        """``(HF module name, BitLinear)`` for every projection, in checkpoint order."""
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for n, proj in zip("qkv", layer.attention.projections, strict=True):
                yield f"{p}self_attn.{n}_proj", proj
            yield f"{p}self_attn.o_proj", layer.attention.o_proj
            for n, proj in zip(("gate", "up"), layer.mlp.projections, strict=True):
                yield f"{p}mlp.{n}_proj", proj
            yield f"{p}mlp.down_proj", layer.mlp.down_proj

    def named_norms(self) -> Iterator[tuple[str, RMSNorm]]:
        """``(HF weight name, RMSNorm)`` for every norm, BitLinear input norms included."""
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            yield f"{p}input_layernorm.weight", layer.input_norm
            yield f"{p}post_attention_layernorm.weight", layer.post_attention_norm
            if self.config.sub_norms:
                yield f"{p}{self.config.sub_norm_names[0]}.weight", layer.attention.sub_norm
                yield f"{p}{self.config.sub_norm_names[1]}.weight", layer.mlp.sub_norm
        yield "model.norm.weight", self.norm
        for name, linear in self.named_linears():
            if linear.input_norm is not None:
                yield f"{name}.rms_norm.weight", linear.input_norm

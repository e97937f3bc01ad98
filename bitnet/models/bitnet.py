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
from ..memory import Arena
from ..nn import MLP, Attention, BitLinear, Embedding, KVCache, RMSNorm, RotaryEmbedding, checks, scratch
from ..nn.attention import CACHE_DTYPES, INITIAL_CACHE_LENGTH, CacheRows
from ..nn.changes import Tracked
from ..nn.norm import check_norm
from .compiled import CompiledLayers
from .config import BitNetConfig
from .sampling import Sampler


class DecoderLayer(Tracked):
    """Pre-norm attention and MLP blocks, each added to the residual stream."""

    def __init__(self, attention: Attention, mlp: MLP, input_norm: RMSNorm, post_attention_norm: RMSNorm) -> None:
        self.attention = attention
        self.mlp = mlp
        self.input_norm = input_norm
        self.post_attention_norm = post_attention_norm

    def __call__(self, x: np.ndarray, sequences: list[tuple[KVCache, slice]], index: int) -> None:
        """Update the residual stream ``x`` (``(n, hidden)``, writeable) in place; ``sequences`` pairs
        each sequence's cache with its rows of ``x`` (see :meth:`Attention.batched`)."""
        self.check()
        self.attention.check_batch(x, sequences, index)
        if not x.flags.writeable:
            raise errors.ShapeError("the residual stream x is updated in place: pass a writeable array")
        self._forward(x, CacheRows(sequences), index)

    def check(self, hidden: int | None = None) -> None:
        """Raise unless this layer can run over ``hidden`` features (its attention's, when None): its
        norms, attention and MLP each checked (``check``) over that width. The kernels check none
        of it, and a user may have assigned any of it since construction."""
        if not isinstance(self.attention, Attention) or not isinstance(self.mlp, MLP):
            raise errors.DTypeError("a decoder layer's attention and mlp must be bn.nn.Attention and bn.nn.MLP")
        hidden = self.attention.hidden_size if hidden is None else hidden
        self.attention.check(hidden)
        self.mlp.check(hidden)
        check_norm(self.input_norm, hidden, "input_layernorm")
        check_norm(self.post_attention_norm, hidden, "post_attention_layernorm")

    def _forward(self, x: np.ndarray, rows: CacheRows, index: int) -> None:
        """``self(x, sequences, index)`` for arguments the model has checked: it checks the ids and
        every cache once per step, and the layers then run without checks of their own (``rows``:
        the step's sequences, tabled once for all layers)."""
        attended = self.attention._batched(self.input_norm._forward(x), rows, index)
        x += self.mlp._forward(self.post_attention_norm._add_and_normalize(x, attended))


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


# The largest scale a projection may have: float16's largest value, the most a GGUF TQ block scale can
# hold. Real ternary weights have scales near mean|w| (far below 1); one past this makes float32
# activations overflow to Inf a layer or two later.
MAX_WEIGHT_SCALE = float(np.finfo(np.float16).max)


def check_weights(config: BitNetConfig, weights: dict[str, object]) -> None:
    """Raise CheckpointError unless ``weights`` are exactly the tensors ``config`` describes, usable as they are.

    Each projection must be a :class:`BitLinear` of ``config.linear_shapes()`` with scales in
    ``[0, MAX_WEIGHT_SCALE]``, not all zero (a ``weight_scale`` of 0, NaN, Inf or below 0 means a
    corrupt checkpoint) and a finite bias; each norm a finite float vector of
    ``config.norm_shapes()``; the embedding and untied head ``(vocab_size, hidden_size)``.
    """
    c = config
    disagree = f"the {c.num_hidden_layers}-layer {c.default_architecture()} config and the weights disagree"
    if c.weight_count() > len(weights):  # named without listing every weight: a config may claim 2**31 layers
        name = next(name for name, _ in c.weight_shapes() if name not in weights)
        raise errors.CheckpointError(
            f"tensor {name!r} (and at least {c.weight_count() - len(weights) - 1} more) is missing: {disagree}"
        )
    expected = dict(c.weight_shapes())
    missing = [name for name in expected if name not in weights]
    extra = sorted(set(weights) - set(expected) - {"lm_head.weight"})  # a tied model ignores a stored head
    if missing or extra:
        name = (missing or extra)[0]
        count = len(missing or extra) - 1
        raise errors.CheckpointError(
            f"tensor {name!r} (and {count} more) is {'missing' if missing else 'not part of the model'}: {disagree}"
        )
    for name, shape in expected.items():
        value = weights[name]
        if not name.endswith(".weight"):
            _check_projection(name, value, shape)
            continue
        if not isinstance(value, np.ndarray) or np.shape(value) != shape:
            got = np.shape(value) if isinstance(value, np.ndarray) else type(value).__name__
            raise errors.CheckpointError(
                f"tensor {name!r} is {got} but the config implies an array of shape {shape}: the config and the "
                f"weights disagree"
            )
        # Norm gains are small and multiply every activation; the tables are too big to scan on each load.
        if len(shape) == 1 and not (value.dtype.kind == "f" and np.isfinite(value).all()):
            raise errors.CheckpointError(f"norm {name!r} must hold finite floats: the checkpoint is corrupt")


def _check_projection(name: str, linear: object, shape: tuple[int, ...]) -> None:
    """The projection part of :func:`check_weights`."""
    if not isinstance(linear, BitLinear):
        raise errors.CheckpointError(f"{name!r} must be a BitLinear projection, got {type(linear).__name__}")
    if (linear.out_features, linear.in_features) != shape:
        raise errors.CheckpointError(
            f"projection {name!r} is {linear.out_features}x{linear.in_features} but the config implies "
            f"{shape[0]}x{shape[1]}: the config and the weights disagree"
        )
    scale = linear.weight.scale
    if not ((scale >= 0).all() and (scale <= MAX_WEIGHT_SCALE).all() and scale.any()):
        raise errors.CheckpointError(
            f"projection {name!r} has scale(s) {np.unique(scale)[:4]}: a weight scale must lie in "
            f"[0, {MAX_WEIGHT_SCALE:g}] and not be all 0 (a weight_scale of 0, NaN, Inf, below 0 or near the float "
            f"limits means a corrupt checkpoint)"
        )
    if linear.bias is not None and not np.isfinite(linear.bias).all():
        raise errors.CheckpointError(f"the bias of {name!r} holds NaN or Inf values: the checkpoint is corrupt")
    if linear.input_norm is not None and not np.isfinite(linear.input_norm.weight).all():
        raise errors.CheckpointError(f"the input norm of {name!r} holds NaN or Inf values: the checkpoint is corrupt")


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
        if not isinstance(config, BitNetConfig):
            raise errors.ConfigError(f"config must be a BitNetConfig, got {type(config).__name__}")
        table_shape = (config.vocab_size, config.hidden_size)
        for name, table in (("embed_tokens", embed_tokens), ("lm_head", embed_tokens if lm_head is None else lm_head)):
            if not isinstance(table, Embedding) or (table.vocab_size, table.hidden_size) != table_shape:
                raise errors.ShapeError(f"{name} must be an Embedding of shape {table_shape} (vocab x hidden size)")
        if not isinstance(norm, RMSNorm) or norm.weight.shape != (config.hidden_size,):
            raise errors.ShapeError(f"norm must be an RMSNorm over the {config.hidden_size} hidden features")
        self.config = config
        self.embed_tokens = embed_tokens
        self.layers = layers
        self.norm = norm
        self.lm_head = embed_tokens if lm_head is None else lm_head
        self.kv_dtype = "float32"
        self._compiled: CompiledLayers | None = None
        self._check_layers()

    def __getstate__(self) -> dict:
        """Copies and pickles leave the compiled layers' tables behind (they hold the addresses of
        this model's arrays); a copy builds its own at its first step."""
        return {**self.__dict__, "_compiled": None}

    @property
    def tied(self) -> bool:
        return self.lm_head is self.embed_tokens

    @property
    def kv_dtype(self) -> str:
        """Storage of the caches this model makes: "float32" (the default: the numbers HF
        transformers computes, to float32 rounding) or "float16" (llama.cpp's default: half the
        bytes a long context reads per token; logits move by about 1e-3 of their range)."""
        return self._kv_dtype

    @kv_dtype.setter
    def kv_dtype(self, dtype: str) -> None:
        self._kv_dtype = errors.check_choice("kv_dtype", dtype, CACHE_DTYPES)

    def new_cache(self, capacity: int = INITIAL_CACHE_LENGTH, arena: Arena | None = None) -> KVCache:
        """An empty key/value cache for one sequence, of :attr:`kv_dtype`.

        It grows by doubling past ``capacity``, up to the model's context
        (``config.max_position_embeddings``), which it never exceeds. With ``arena`` its
        buffers come from that :class:`bitnet.Arena`; ``cache.release()`` gives them back.
        """
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, c.max_position_embeddings,
                       self.kv_dtype, arena)

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

        Raises
        ------
        ShapeError, DTypeError or InvalidValueError for ids that are not a non-empty 1-D
        array of ids in ``[0, vocab_size)``, a cache made for another model, or an ``out`` of
        another shape or dtype; InvalidValueError when the sequence would run past the
        model's context (``config.max_position_embeddings``). All before anything runs.
        """
        ids = self._checked_ids(input_ids)
        errors.checked_out(out, (1 if last_only else len(ids), self.config.vocab_size))
        if cache is None:
            self._check_context(len(ids), "run a shorter input")
            cache = self.new_cache(len(ids))
        else:
            cache = self._checked_cache(cache, len(ids))
        return self._run([ids], [cache], last_only, out)

    __call__ = forward

    def forward_batch(self, sequences, caches: list[KVCache], out: np.ndarray | None = None) -> np.ndarray:
        """Continue several sequences at once: the logits of each one's last new position.

        The projections run once over all the new tokens (``n`` = their total, so a decode
        step of 8 sequences streams the weights once); each sequence attends over its own
        cache, all of them in one kernel call per layer. Each row equals what :meth:`forward` gives that sequence alone
        with ``last_only=True``: quantization, norms and attention are per row.

        Parameters
        ----------
        sequences : list of 1-D array_like of int token ids, one entry per sequence (one
            token for a decode step, several for a chunk of a prompt).
        caches : ``caches[i]`` holds sequence ``i`` so far (made by :meth:`new_cache`; each
            cache once) and is extended by its tokens.
        out : float32 array of shape ``(len(sequences), vocab_size)`` to write into.

        Returns
        -------
        ndarray of float32, shape ``(len(sequences), vocab_size)``.

        Raises
        ------
        InvalidValueError, ShapeError or DTypeError, before anything runs, for what
        :meth:`forward` refuses in any one sequence, lists of different lengths, an empty
        list or a cache given twice.
        """
        if not isinstance(sequences, (list, tuple)) or not isinstance(caches, (list, tuple)):
            raise errors.InvalidValueError("sequences and caches must be lists (one entry per sequence)")
        if not sequences or len(sequences) != len(caches):
            raise errors.InvalidValueError(
                f"give one cache per sequence and at least one sequence: got {len(sequences)} sequences and "
                f"{len(caches)} caches"
            )
        if len({id(cache) for cache in caches}) != len(caches):
            raise errors.InvalidValueError("a KV cache appears twice in caches: each sequence needs its own")
        ids = [self._checked_ids(s) for s in sequences]
        errors.checked_out(out, (len(ids), self.config.vocab_size))
        caches = [self._checked_cache(cache, len(i)) for cache, i in zip(caches, ids, strict=True)]
        return self._run(ids, caches, True, out)

    def _checked_cache(self, cache: object, new: int) -> KVCache:
        """``cache``, checked to be this model's and reserved for ``new`` more positions within the context."""
        c = self.config
        if not isinstance(cache, KVCache):
            raise errors.DTypeError(f"cache must be a bn.nn.KVCache, got {type(cache).__name__}")
        cache.check(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        self._check_context(cache.length + new, "start a new cache, or run a shorter input")
        cache.reserve(cache.length + new)
        return cache

    def _run(self, ids: list[np.ndarray], caches: list[KVCache], last_only: bool,
             out: np.ndarray | None) -> np.ndarray:
        """The forward pass over checked sequences: the logits of every token, or of each sequence's last."""
        ends = np.cumsum([len(i) for i in ids]).tolist()
        sequences = [(cache, slice(end - len(i), end)) for cache, i, end in zip(caches, ids, ends, strict=True)]
        layers = self._current_layers()  # checks the layers if any changed, before anything runs
        with scratch.step():
            tokens = ids[0] if len(ids) == 1 else np.concatenate(ids)
            x = self.embed_tokens.rows(tokens, out=scratch.empty((len(tokens), self.config.hidden_size)))
            self._layers_forward(x, CacheRows(sequences), layers)
            for cache, i in zip(caches, ids, strict=True):
                cache.length += len(i)
            if last_only and len(ids) == 1:
                x = x[-1:]
            elif last_only and ends[-1] > len(ids):  # some sequence brought several tokens: keep each one's last
                x = np.take(x, [end - 1 for end in ends], axis=0, out=scratch.empty((len(ends), x.shape[1])))
            return self.lm_head.logits(self.norm(x), out=out)

    def _layers_forward(self, x: np.ndarray, rows: CacheRows, compiled: CompiledLayers) -> None:
        """Every layer over the residual stream ``x`` of checked sequences: in one compiled call
        (``compiled``, the layers' current tables) where it can take the layers, else layer by layer."""
        if compiled.reason is None and len(rows.groups) == 1:
            compiled.run(x, rows.groups[0], rows.end)
            return
        for index, layer in enumerate(self.layers):
            layer._forward(x, rows, index)

    def _current_layers(self) -> CompiledLayers:
        """The layers' compiled tables, built again, after a check of every layer, once a layer changed."""
        compiled = self._compiled
        if compiled is None or not compiled.current(self.layers):
            self._check_layers()
            compiled = self._compiled = CompiledLayers(self.layers, self.config.hidden_size)
        return compiled

    def _check_layers(self) -> None:
        """Raise unless the layers can run in this model: as many as the config says, each one
        checked over the hidden size (``DecoderLayer.check``) with the head layout its caches
        have. Layers are plain objects a user may change, and neither path's kernels check."""
        c = self.config
        if not isinstance(self.layers, list) or len(self.layers) != c.num_hidden_layers:
            count = len(self.layers) if isinstance(self.layers, (list, tuple)) else type(self.layers).__name__
            raise errors.ShapeError(f"the config has {c.num_hidden_layers} layers: model.layers must be a list of as "
                                    f"many DecoderLayer, got {count}")
        for index, layer in enumerate(self.layers):
            try:
                if not isinstance(layer, DecoderLayer):
                    raise errors.DTypeError(f"it is a {type(layer).__name__}, not a DecoderLayer")
                layer.check(c.hidden_size)
                attention = layer.attention
                if (attention.kv_heads, attention.head_dim) != (c.num_key_value_heads, c.head_dim):
                    raise errors.ShapeError(
                        f"its attention has {attention.kv_heads} key/value heads of {attention.head_dim} features; "
                        f"the model's caches hold {c.num_key_value_heads} of {c.head_dim}")
            except errors.BitNetError as exc:
                raise type(exc)(f"model.layers[{index}]: {exc}") from None

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
        config's ``eos_token_id``). Sampling arguments are those of :meth:`generate`, and
        are all checked here, before the first token is asked for.
        """
        ids = self._checked_ids(input_ids)
        if not checks.is_int(max_new_tokens) or max_new_tokens < 0:
            raise errors.InvalidValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        self._check_context(len(ids) + int(max_new_tokens),
                            f"the prompt has {len(ids)} tokens: ask for at most "
                            f"{max(0, self.config.max_position_embeddings - len(ids))} new tokens, or shorten it")
        stop_ids = set(self.config.stop_token_ids if stop is None else self._token_list(stop, "stop"))
        allowed = None if first_tokens is None else self._token_list(first_tokens, "first_tokens")
        if allowed is not None and not allowed:
            raise errors.InvalidValueError("first_tokens is empty: no token could be generated first")
        sampler = Sampler(temperature, top_k, top_p, seed)
        return self._generated(ids, int(max_new_tokens), sampler, stop_ids, allowed)

    def _generated(
        self, ids: np.ndarray, max_new_tokens: int, sampler: Sampler, stop_ids: set[int], allowed: list[int] | None
    ) -> Iterator[int]:
        """The generator behind :meth:`stream`, its arguments checked."""
        # The cache starts at the prompt plus a few steps and grows by doubling as tokens come, so
        # a large max_new_tokens that EOS cuts short never allocates its whole cache.
        cache = self.new_cache(len(ids) + min(max_new_tokens, INITIAL_CACHE_LENGTH))
        logits = self.forward(ids, cache, last_only=True)
        first = logits if allowed is None else self._restricted(logits, allowed)
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

        Raises
        ------
        InvalidValueError (or another ``bn.BitNetError``) before any work for a bad argument:
        a ``max_new_tokens`` that is not an integer >= 0, sampling settings out of range,
        ``stop`` / ``first_tokens`` ids outside the vocabulary, or a prompt plus
        ``max_new_tokens`` longer than the model's context (``config.max_position_embeddings``).
        """
        errors.check_callback(callback, "callback")
        tokens = []
        for token in self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop, first_tokens):
            tokens.append(token)
            if callback is not None:
                callback(token)
        return tokens

    @staticmethod
    def _restricted(logits: np.ndarray, allowed: list[int]) -> np.ndarray:
        """``logits`` with every id outside ``allowed`` set to -inf."""
        restricted = np.full_like(logits, -np.inf)
        restricted[:, allowed] = logits[:, allowed]
        return restricted

    def _checked_ids(self, input_ids) -> np.ndarray:
        ids = checks.checked_ids(input_ids, self.config.vocab_size, "input_ids")
        if ids.size == 0:
            raise errors.ShapeError("input_ids is empty: give at least one token id")
        return ids

    def _token_list(self, values: object, name: str) -> list[int]:
        """``values`` (an iterable of token ids: ``stop``, ``first_tokens``) as a list of ints in the vocabulary."""
        try:
            ids = list(values)
        except TypeError:
            raise errors.InvalidValueError(f"{name} must be an iterable of token ids, got {values!r:.80}") from None
        is_id = [checks.is_int(i) for i in ids]
        if not all(is_id):
            raise errors.InvalidValueError(f"{name} must hold integer token ids, got {ids[is_id.index(False)]!r:.80}")
        return checks.checked_ids(np.array(ids, np.int64), self.config.vocab_size, name).tolist()

    def _check_context(self, positions: int, hint: str) -> None:
        """InvalidValueError when a sequence of ``positions`` would not fit the model's context."""
        context = self.config.max_position_embeddings
        if positions > context:
            raise errors.InvalidValueError(
                f"{positions} positions exceed the model's context of {context} (config.max_position_embeddings): "
                f"{hint}"
            )

    @classmethod
    def from_weights(
        cls, config: BitNetConfig, weights: dict[str, object], head_dtype: str = "auto"
    ) -> BitNetForCausalLM:
        """Assemble a model from HF-named weights.

        ``weights`` maps HF tensor names to a :class:`BitLinear` for projections
        (``model.layers.0.self_attn.q_proj``, ...) and float arrays for norms and embeddings
        (``model.embed_tokens.weight``, and ``lm_head.weight`` unless the head is tied).
        ``head_dtype`` is the storage of the embedding/head ("auto", "f32", "f16", "bf16", "int8").

        Every loader (HF, GGUF) ends here, so this is where weights are checked against the
        config (:func:`check_weights`): CheckpointError for a missing, extra or misshapen
        tensor, a projection scale that is NaN, Inf, negative or all zero, or a norm or bias
        holding NaN or Inf.
        """
        check_weights(config, weights)
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
        for linear in self.running_linears():
            linear.to(device)
        return self

    def running_linears(self) -> Iterator[BitLinear]:
        """Every BitLinear a forward pass calls, in order (q/k/v and gate/up stacked into one each)."""
        for layer in self.layers:
            yield from layer.attention.running_linears
            yield from layer.mlp.running_linears

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

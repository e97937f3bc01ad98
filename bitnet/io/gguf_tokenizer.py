"""The tokenizer kept in a GGUF file's ``tokenizer.ggml.*`` metadata, as a ``tokenizers.Tokenizer``.

Two kinds are supported:

* byte-level BPE (``tokenizer.ggml.model == "gpt2"``), the one the BitNet b1.58 2B4T
  conversion (Llama-3 tokenizer, ``tokenizer.ggml.pre == "llama-bpe"``) uses. It is rebuilt
  the way HF's ``tokenizer.json`` describes the same tokenizer: a BPE model over the
  byte-level alphabet, a pre-tokenizer that splits text with the model family's regex, a
  byte-level decoder, and the control tokens as special tokens.
* SentencePiece BPE with byte fallback (``tokenizer.ggml.model == "llama"``), the Llama-2
  tokenizer of the 1bitLLM / Llama-2 style conversions. It is rebuilt the way transformers
  converts a SentencePiece model (``LlamaConverter``) or a GGUF file of one: a BPE model with
  byte fallback whose merges are recovered from the vocabulary and the token scores, a
  normalizer that spells spaces "▁" (and adds one in front when ``add_space_prefix``), and a
  decoder that undoes it and turns "<0x0A>"-style byte tokens back into bytes.

GGUF stores ``tokens`` (id -> token string), ``token_type`` (1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte), ``merges`` ("left right" strings, best first; byte-level
BPE only), ``scores`` (one float per token; SentencePiece only) and the BOS/EOS/UNK ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import errors

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MODEL_KEY = "tokenizer.ggml.model"
PRE_KEY = "tokenizer.ggml.pre"
TOKENS_KEY = "tokenizer.ggml.tokens"
TYPES_KEY = "tokenizer.ggml.token_type"
MERGES_KEY = "tokenizer.ggml.merges"
SCORES_KEY = "tokenizer.ggml.scores"
BOS_KEY = "tokenizer.ggml.bos_token_id"
EOS_KEY = "tokenizer.ggml.eos_token_id"
UNK_KEY = "tokenizer.ggml.unknown_token_id"
ADD_BOS_KEY = "tokenizer.ggml.add_bos_token"
ADD_SPACE_PREFIX_KEY = "tokenizer.ggml.add_space_prefix"

BPE_MODEL = "gpt2"
SPM_MODEL = "llama"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space

# Llama-3's split regex (HF tokenizer.json of Llama 3 and BitNet b1.58 2B4T; llama.cpp "llama-bpe").
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
# The plain GPT-2 byte-level split (the ByteLevel pre-tokenizer's own regex).
GPT2_PRE = ("gpt-2", "gpt2", "default")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise errors.GGUFError(
            'reading a GGUF tokenizer needs the tokenizers package: pip install "bitnet-numba[hf]"'
        ) from None
    return tokenizers


def build_tokenizer(
    model: str,
    pre: str | None,
    tokens: Sequence[str],
    token_types: Sequence[int] | None,
    merges: Sequence[str],
    bos_token_id: int | None = None,
    add_bos: bool | None = None,
    *,
    scores: Sequence[float] | None = None,
    unk_token_id: int | None = None,
    add_space_prefix: bool | None = None,
) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from the values of the ``tokenizer.ggml.*`` keys.

    Parameters
    ----------
    model, pre : ``tokenizer.ggml.model`` ("gpt2" or "llama") and ``tokenizer.ggml.pre``.
    tokens, token_types, merges : the token strings by id, their types, and the BPE merges
        (byte-level BPE; a SentencePiece vocabulary has none and ignores them).
    bos_token_id : the BOS id, added in front of every encoding when ``add_bos``.
    add_bos : ``tokenizer.ggml.add_bos_token``; None means llama.cpp's default (True for
        llama-bpe and for SentencePiece, False for plain GPT-2).
    scores : ``tokenizer.ggml.scores``, one per token; SentencePiece only, where it is required.
    unk_token_id : ``tokenizer.ggml.unknown_token_id``; SentencePiece only (default: the token
        typed unknown, else "<unk>"). Text no token or byte token covers becomes this token.
    add_space_prefix : ``tokenizer.ggml.add_space_prefix``; SentencePiece only, None means True.

    Raises
    ------
    GGUFError for another tokenizer kind or pre-tokenizer, or inconsistent vocabulary data.
    """
    if model == SPM_MODEL:
        return _build_sentencepiece(tokens, token_types, scores, bos_token_id, unk_token_id, add_bos, add_space_prefix)
    tk = _tokenizers()
    if model != BPE_MODEL:
        raise errors.GGUFError(
            f"tokenizer kind {MODEL_KEY}={model!r} is not supported: only byte-level BPE ({BPE_MODEL!r}) and "
            f"SentencePiece BPE ({SPM_MODEL!r}) are; pass token ids directly, or use the model's HF tokenizer.json"
        )
    pre = pre or "default"
    if pre not in LLAMA3_PRE + GPT2_PRE:
        known = ", ".join(LLAMA3_PRE + GPT2_PRE)
        raise errors.GGUFError(f"BPE pre-tokenizer {PRE_KEY}={pre!r} is not supported; supported: {known}")
    _check_types(tokens, token_types)
    llama3 = pre in LLAMA3_PRE
    vocab = _vocab(tokens)
    pairs = [_merge_pair(merge) for merge in merges]
    try:
        # Llama-3 looks a whole pre-token up in the vocabulary before merging (llama.cpp's
        # ignore_merges for llama-bpe, "ignore_merges": true in its tokenizer.json).
        tokenizer = tk.Tokenizer(tk.models.BPE(vocab, pairs, ignore_merges=llama3))
    except Exception as exc:  # tokenizers raises untyped errors for inconsistent vocab/merges
        raise errors.GGUFError(f"the GGUF tokenizer's vocabulary and merges disagree ({exc})") from None
    if llama3:
        tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split(tk.Regex(LLAMA3_PATTERN), behavior="isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = tk.decoders.ByteLevel()
    _add_special_tokens(tokenizer, tokens, token_types)
    if add_bos is None:
        add_bos = llama3
    if add_bos and bos_token_id is not None:
        _prepend_bos(tokenizer, tokens, bos_token_id)
    return tokenizer


def _build_sentencepiece(
    tokens: Sequence[str],
    token_types: Sequence[int] | None,
    scores: Sequence[float] | None,
    bos_token_id: int | None,
    unk_token_id: int | None,
    add_bos: bool | None,
    add_space_prefix: bool | None,
) -> Tokenizer:
    """SentencePiece BPE with byte fallback, as transformers' ``LlamaConverter`` builds it (legacy spacing).

    The spacing follows llama.cpp: a "▁" goes in front of the text and of every piece of text
    that follows a special token (the normalizer runs on each piece between added tokens).
    """
    tk = _tokenizers()
    if scores is None:
        raise errors.GGUFError(f"a SentencePiece ({SPM_MODEL!r}) vocabulary needs {SCORES_KEY}, which is missing")
    if len(scores) != len(tokens):
        raise errors.GGUFError(f"{SCORES_KEY} has {len(scores)} entries but {TOKENS_KEY} has {len(tokens)}")
    _check_types(tokens, token_types)
    vocab = _vocab(tokens)
    types = list(token_types) if token_types is not None else [NORMAL] * len(tokens)
    unk = _unk_token(tokens, types, unk_token_id, vocab)
    try:
        bpe = tk.models.BPE(vocab, _spm_merges(tokens, types, scores, vocab), unk_token=unk, fuse_unk=True,
                            byte_fallback=True)
    except Exception as exc:  # tokenizers raises untyped errors for inconsistent vocab/merges
        raise errors.GGUFError(f"the GGUF tokenizer's vocabulary cannot be built ({exc})") from None
    tokenizer = tk.Tokenizer(bpe)
    prefix = True if add_space_prefix is None else bool(add_space_prefix)
    replace = tk.normalizers.Replace(" ", SPACE)
    tokenizer.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend(SPACE), replace]) if prefix else replace
    tokenizer.pre_tokenizer = None
    steps = [tk.decoders.Replace(SPACE, " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
    if prefix:
        steps.append(tk.decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = tk.decoders.Sequence(steps)
    # The unknown token is special in SentencePiece and llama.cpp alike; so are the control tokens.
    special = [i for i, kind in enumerate(types) if kind in (CONTROL, UNKNOWN)]
    tokenizer.add_special_tokens([tk.AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tokenizer.add_tokens([tk.AddedToken(tokens[i], special=False, normalized=False)
                          for i, kind in enumerate(types) if kind == USER_DEFINED])
    if (True if add_bos is None else add_bos) and bos_token_id is not None:
        _prepend_bos(tokenizer, tokens, bos_token_id)
    return tokenizer


def _check_types(tokens: Sequence[str], token_types: Sequence[int] | None) -> None:
    if token_types is not None and len(token_types) != len(tokens):
        raise errors.GGUFError(f"{TYPES_KEY} has {len(token_types)} entries but {TOKENS_KEY} has {len(tokens)}")


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise errors.GGUFError(f"{TOKENS_KEY} holds the same token string twice; the file is corrupt")
    return vocab


def _unk_token(tokens: Sequence[str], types: Sequence[int], unk_token_id: int | None, vocab: dict) -> str | None:
    if unk_token_id is not None:
        if not 0 <= unk_token_id < len(tokens):
            raise errors.GGUFError(f"{UNK_KEY}={unk_token_id} is not a token id (the vocabulary has {len(tokens)})")
        return tokens[unk_token_id]
    typed = [tokens[i] for i, kind in enumerate(types) if kind == UNKNOWN]
    if typed:
        return typed[0]
    return "<unk>" if "<unk>" in vocab else None


def _spm_merges(
    tokens: Sequence[str], types: Sequence[int], scores: Sequence[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies, best first.

    As transformers' ``generate_merges`` (used by its SentencePiece and GGUF converters): every
    split of a token into two tokens of the vocabulary is a merge; the splits of one token are
    ordered by the ids of their halves, and all merges by the merged token's score (best
    first), then by the lengths of the halves (longer first), the sort being stable. Control,
    unknown and byte tokens are never the result of a merge (SentencePiece only merges into
    normal, user-defined and unused pieces), so they give none.
    """
    merges = []
    for token, kind, score in zip(tokens, types, scores, strict=True):
        if kind in (CONTROL, UNKNOWN, BYTE):
            continue
        local = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                 if token[:cut] in vocab and token[cut:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((left, right, float(score)) for left, right in local)
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _merge_pair(merge: str) -> tuple[str, str]:
    # Byte-level tokens never hold a plain space (it is spelled "Ġ"), so one space separates the pair.
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise errors.GGUFError(f"{MERGES_KEY} entry {merge!r} is not two tokens separated by a space")
    return left, right


def _add_special_tokens(tokenizer, tokens: Sequence[str], token_types: Sequence[int] | None) -> None:
    """Control tokens become special tokens, user-defined ones plain added tokens (both keep their ids)."""
    if token_types is None:
        return
    tk = _tokenizers()
    special = [tk.AddedToken(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(token_types) if kind == CONTROL]
    added = [tk.AddedToken(tokens[i], special=False, normalized=False)
             for i, kind in enumerate(token_types) if kind == USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(added)


def _prepend_bos(tokenizer, tokens: Sequence[str], bos_token_id: int) -> None:
    if not 0 <= bos_token_id < len(tokens):
        raise errors.GGUFError(f"{BOS_KEY}={bos_token_id} is not a token id (the vocabulary has {len(tokens)})")
    tk = _tokenizers()
    bos = tokens[bos_token_id]
    # A template names its special tokens by keys that tokenizers parses ("key:type_id", "$A" a
    # sequence), so a token text holding ":" or whitespace, or starting with "$", is no usable key:
    # such a BOS goes under a plain alias, the ids and token text it stands for being given apart.
    key = bos if bos and ":" not in bos and not bos.startswith("$") and not any(c.isspace() for c in bos) else "[BOS]"
    tokenizer.post_processor = tk.processors.TemplateProcessing(
        single=[f"{key}:0", "$A:0"],
        pair=[f"{key}:0", "$A:0", f"{key}:1", "$B:1"],
        special_tokens=[{"id": key, "ids": [bos_token_id], "tokens": [bos]}],
    )


def tokenizer_metadata(tokenizer: Tokenizer, bos_token_id: int | None, eos_token_id: int | None) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values of a byte-level BPE ``tokenizers.Tokenizer``.

    Raises
    ------
    GGUFError when the tokenizer is not byte-level BPE (SentencePiece, WordPiece, ...).
    """
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise errors.GGUFError("only byte-level BPE tokenizers (GPT-2 / Llama-3 style) can be written to GGUF")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [USER_DEFINED] * size
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    for i, added in tokenizer.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    values: dict[str, Any] = {
        MODEL_KEY: BPE_MODEL,
        PRE_KEY: LLAMA3_PRE[0] if LLAMA3_PATTERN in _split_patterns(spec.get("pre_tokenizer")) else GPT2_PRE[0],
        TOKENS_KEY: tokens,
        TYPES_KEY: types,
        MERGES_KEY: merges,
        ADD_BOS_KEY: bos_token_id is not None and _adds_bos(spec, tokens, bos_token_id),
    }
    if bos_token_id is not None:
        values[BOS_KEY] = bos_token_id
    if eos_token_id is not None:
        values[EOS_KEY] = eos_token_id
    return values


def _split_patterns(spec: Any) -> list[str]:
    """Every regex in a ``tokenizer.json`` pre-tokenizer spec (Split patterns are ``{"Regex": ...}``)."""
    if isinstance(spec, dict):
        own = [spec["Regex"]] if isinstance(spec.get("Regex"), str) else []
        return own + [p for value in spec.values() for p in _split_patterns(value)]
    if isinstance(spec, list):
        return [p for value in spec for p in _split_patterns(value)]
    return []


def _adds_bos(spec: dict, tokens: list[str], bos_token_id: int) -> bool:
    """Whether the tokenizer's post-processor puts the BOS token in front of each encoding."""
    if not 0 <= bos_token_id < len(tokens):
        return False
    return json.dumps(tokens[bos_token_id]) in json.dumps(spec.get("post_processor"))

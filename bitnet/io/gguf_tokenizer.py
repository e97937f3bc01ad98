"""The tokenizer kept in a GGUF file's ``tokenizer.ggml.*`` metadata, as a ``tokenizers.Tokenizer``.

Only the byte-level BPE kind is supported (``tokenizer.ggml.model == "gpt2"``): the one the
BitNet b1.58 2B4T conversion (Llama-3 tokenizer, ``tokenizer.ggml.pre == "llama-bpe"``)
uses. The tokenizer is rebuilt the way HF's ``tokenizer.json`` describes the same
tokenizer: a BPE model over the byte-level alphabet, a pre-tokenizer that splits text with
the model family's regex, a byte-level decoder, and the control tokens as special tokens.

GGUF stores ``tokens`` (id -> token string), ``token_type`` (1 normal, 3 control,
4 user-defined, ...), ``merges`` ("left right" strings, best first) and the BOS/EOS ids.
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
BOS_KEY = "tokenizer.ggml.bos_token_id"
EOS_KEY = "tokenizer.ggml.eos_token_id"
ADD_BOS_KEY = "tokenizer.ggml.add_bos_token"

BPE_MODEL = "gpt2"
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

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
            'reading a GGUF tokenizer needs the tokenizers package: pip install "bitnet[hf]"'
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
) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from the values of the ``tokenizer.ggml.*`` keys.

    Parameters
    ----------
    model, pre : ``tokenizer.ggml.model`` and ``tokenizer.ggml.pre``.
    tokens, token_types, merges : the token strings by id, their types, and the BPE merges.
    bos_token_id : the BOS id, added in front of every encoding when ``add_bos``.
    add_bos : ``tokenizer.ggml.add_bos_token``; None means llama.cpp's default (True for llama-bpe).

    Raises
    ------
    GGUFError for another tokenizer kind or pre-tokenizer, or inconsistent vocabulary data.
    """
    tk = _tokenizers()
    if model != BPE_MODEL:
        raise errors.GGUFError(
            f"tokenizer kind {MODEL_KEY}={model!r} is not supported: only byte-level BPE ({BPE_MODEL!r}) is; "
            f"pass token ids directly, or use the model's HF tokenizer.json"
        )
    pre = pre or "default"
    if pre not in LLAMA3_PRE + GPT2_PRE:
        known = ", ".join(LLAMA3_PRE + GPT2_PRE)
        raise errors.GGUFError(f"BPE pre-tokenizer {PRE_KEY}={pre!r} is not supported; supported: {known}")
    if token_types is not None and len(token_types) != len(tokens):
        raise errors.GGUFError(f"{TYPES_KEY} has {len(token_types)} entries but {TOKENS_KEY} has {len(tokens)}")
    llama3 = pre in LLAMA3_PRE
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise errors.GGUFError(f"{TOKENS_KEY} holds the same token string twice; the file is corrupt")
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
    tokenizer.post_processor = tk.processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_token_id)]
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

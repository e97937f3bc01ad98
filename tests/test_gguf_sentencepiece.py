"""GGUF SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``) rebuilt as ``tokenizers.Tokenizer``.

The oracle is SentencePiece itself: a tiny BPE model with byte fallback is trained here (Llama-2's
settings: identity normalization, a dummy prefix, extra whitespace kept), exported as the arrays
llama.cpp's converter writes (pieces, scores, types), rebuilt by ``build_tokenizer`` and compared
id for id with SentencePiece's own encoding. Transformers' GGUF converter, when installed, checks
the same vocabulary a second way.
"""

from __future__ import annotations

import io
import random

import pytest

import bitnet as bn
from bitnet.io.gguf_tokenizer import build_tokenizer

spm = pytest.importorskip("sentencepiece")

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0

TEXTS = [
    "Hello world!", "hello world", " leading space", "   three leading spaces", "trailing space ",
    "multiple   spaces  between    words", "tabs\tand\ttabs", "line one\nline two\n\nline four", "\n",
    "Émile mange des crêpes à Zürich", "naïve café déjà vu", "中文字符", "emoji 🦙🚀 and 中文", "x" * 40,
    "The quick brown fox jumps over 1234567 lazy dogs.", "it's they're we'll I'd", "a", " ", "  ", "",
    "<b>angle brackets</b> stay text", "mixed\t \n \tblanks", "ÀÉÎÕÜ ß ø",
]


def _corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["the", "qu", "ick", "br", "own", "fox", "ju", "mps", "ov", "er", "la", "zy", "dog", "hel", "lo",
                 "wor", "ld", "tra", "in", "ing", "tok", "en", "iz", "é", "è", "ça", "crê", "pe", "zü", "ri", "ch"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(3, 12)):
            word = rng.choice(words)
            if rng.random() < 0.15:
                word = word.capitalize()
            if rng.random() < 0.1:
                word += rng.choice(".,!?;:'")
            if rng.random() < 0.05:
                word = str(rng.randint(0, 99999))
            parts.append(word)
        out.append(" ".join(parts) + ("  " if rng.random() < 0.1 else ""))
    return out


def _train(add_dummy_prefix: bool):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe", vocab_size=420,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix, split_digits=True,
        allow_whitespace_only_pieces=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.fixture(scope="module")
def sp():
    return _train(add_dummy_prefix=True)


def _arrays(sp) -> tuple[list[str], list[float], list[int]]:
    """What llama.cpp's converter stores: tokenizer.ggml.tokens, .scores and .token_type."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
        types.append(kind)
    return tokens, scores, types


def _build(sp, **kwargs):
    tokens, scores, types = _arrays(sp)
    options = dict(scores=scores, unk_token_id=UNK_ID)
    options.update(kwargs)
    return build_tokenizer("llama", None, tokens, types, [], BOS_ID, **options)


def test_the_vocabulary_uses_byte_fallback(sp):
    tokens, _, types = _arrays(sp)
    assert types.count(6) == 256 and "<0x0A>" in tokens
    assert [types[i] for i in (UNK_ID, BOS_ID, EOS_ID)] == [2, 3, 3]
    assert "中" not in tokens and sp.encode("中")[1:] == [tokens.index(f"<0x{b:02X}>") for b in "中".encode()]


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_matches_sentencepiece(sp, text):
    tokenizer = _build(sp)
    assert tokenizer.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    assert tokenizer.encode(text).ids == sp.encode(text, add_bos=True), text
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.decode(tokenizer.encode(text).ids) == sp.decode(sp.encode(text))


def test_many_generated_strings_match_sentencepiece(sp):
    tokenizer = _build(sp)
    rng = random.Random(1)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ  \t\n.,!?'0123456789éèçàüß") + ["中", "🦙", "€", "\u00a0"]
    texts = _corpus(lines=60, seed=7) + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
                                         for _ in range(150)]
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    for text, encoding in zip(texts, encoded, strict=True):
        assert encoding.ids == sp.encode(text), repr(text)
        assert tokenizer.decode(encoding.ids) == text, repr(text)


def test_without_bos(sp):
    tokenizer = _build(sp, add_bos=False)
    for text in TEXTS:
        assert tokenizer.encode(text).ids == sp.encode(text), text


def test_without_space_prefix_matches_sentencepiece_without_dummy_prefix():
    sp = _train(add_dummy_prefix=False)
    tokenizer = _build(sp, add_space_prefix=False)
    for text in TEXTS:
        assert tokenizer.encode(text).ids == sp.encode(text, add_bos=True), text
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.encode("hello", add_special_tokens=False).tokens[0][0] != "\u2581"


def test_special_tokens_stay_whole_with_a_space_prefix_after_them(sp):
    """As llama.cpp with parse_special: a control token is one id, and the text after it gets its own "▁"."""
    tokenizer = _build(sp)
    ids = tokenizer.encode("hello</s>world").ids
    assert ids == sp.encode("hello", add_bos=True) + [EOS_ID] + sp.encode("world")
    assert tokenizer.decode(ids) == "hello world"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s> hello</s> world"


def test_user_defined_tokens_are_kept_whole(sp):
    tokens, scores, types = _arrays(sp)
    tokens[300], types[300] = "<|tool|>", 4
    tokenizer = build_tokenizer("llama", None, tokens, types, [], BOS_ID, scores=scores)
    ids = tokenizer.encode("call<|tool|>now", add_special_tokens=False).ids
    assert 300 in ids and ids[:ids.index(300)] == sp.encode("call")


def test_matches_transformers_gguf_conversion(sp):
    gguf_mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    tokens, scores, types = _arrays(sp)
    reference, _ = gguf_mapping.convert_gguf_tokenizer(
        "llama", {"tokenizer_type": "llama", "tokens": tokens, "scores": scores, "token_type": types})
    tokenizer = _build(sp)
    for text in TEXTS[:-4]:  # texts made of text alone: where legacy and non-legacy spacing agree
        if text.startswith(" ") or not text:
            continue
        assert tokenizer.encode(text, add_special_tokens=False).ids == \
            reference.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize("bos", ["<|begin:of:text|>", "$A", "<s> x", "[BOS]"])
def test_bos_token_text_the_template_cannot_parse_works(sp, bos):
    """TemplateProcessing's "text:id" strings refuse a ":" (real vocabularies have such BOS tokens)."""
    tokens, scores, types = _arrays(sp)
    tokens[BOS_ID] = bos
    tokenizer = build_tokenizer("llama", None, tokens, types, [], BOS_ID, scores=scores)
    encoding = tokenizer.encode("hello")
    assert encoding.ids == sp.encode("hello", add_bos=True)
    assert encoding.tokens[0] == bos
    assert tokenizer.encode("a", "b").ids == [BOS_ID] + sp.encode("a") + [BOS_ID] + sp.encode("b")
    assert tokenizer.decode(encoding.ids) == "hello"


@pytest.mark.parametrize("bos", ["<|begin:of:text|>", "$A", "<bos with space>"])
def test_byte_level_bos_token_text_the_template_cannot_parse_works(bos):
    tk = pytest.importorskip("tokenizers")
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
    tokens = sorted(alphabet) + [bos]
    types = [1] * len(alphabet) + [3]
    tokenizer = build_tokenizer("gpt2", "llama-bpe", tokens, types, [], len(alphabet), True)
    encoding = tokenizer.encode("hi")
    assert encoding.ids == [len(alphabet), tokens.index("h"), tokens.index("i")]
    assert encoding.tokens[0] == bos
    assert tokenizer.decode(encoding.ids) == "hi"


def test_bad_sentencepiece_data_raises_gguf_errors(sp):
    tokens, scores, types = _arrays(sp)
    with pytest.raises(bn.GGUFError, match="scores has 3 entries"):
        build_tokenizer("llama", None, tokens, types, [], BOS_ID, scores=scores[:3])
    with pytest.raises(bn.GGUFError, match="scores"):
        build_tokenizer("llama", None, tokens, types, [], BOS_ID)
    with pytest.raises(bn.GGUFError, match="token_type has 2 entries"):
        build_tokenizer("llama", None, tokens, types[:2], [], BOS_ID, scores=scores)
    with pytest.raises(bn.GGUFError, match="unknown_token_id"):
        build_tokenizer("llama", None, tokens, types, [], BOS_ID, scores=scores, unk_token_id=len(tokens))
    with pytest.raises(bn.GGUFError, match="bos_token_id"):
        build_tokenizer("llama", None, tokens, types, [], len(tokens), scores=scores)
    with pytest.raises(bn.GGUFError, match="twice"):
        build_tokenizer("llama", None, tokens[:-1] + [tokens[5]], types, [], BOS_ID, scores=scores)
    assert issubclass(bn.GGUFError, bn.BitNetError)


def test_unknown_tokenizer_kind_raises_gguf_error():
    with pytest.raises(bn.GGUFError, match="'t5' is not supported"):
        build_tokenizer("t5", None, ["a", "b"], [1, 1], [], scores=[0.0, 0.0])


def test_generate_on_a_1bitllm_gguf_with_a_sentencepiece_vocabulary(sp, tmp_path, capsys):
    """A 1bitLLM-style file (llama.cpp's ``bitnet``: SiLU, sub-norms) whose vocabulary is SentencePiece."""
    from test_gguf import tiny_model

    from bitnet.cli import main
    from bitnet.io import gguf as bitnet_gguf

    gguf = pytest.importorskip("gguf")
    tokens, scores, types = _arrays(sp)
    model = tiny_model(vocab=len(tokens), family="1bitllm", seed=8)
    model.config.bos_token_id, model.config.eos_token_id = BOS_ID, EOS_ID
    path = tmp_path / "1bitllm.gguf"
    writer = bitnet_gguf._writer_class()(str(path), "bitnet")
    bitnet_gguf._write_metadata(writer, model.config, "tq2_0")
    writer.add_tokenizer_model("llama")
    writer.add_list("tokenizer.ggml.tokens", tokens, gguf.GGUFValueType.STRING)
    writer.add_list("tokenizer.ggml.scores", scores, gguf.GGUFValueType.FLOAT32)
    writer.add_list("tokenizer.ggml.token_type", types, gguf.GGUFValueType.INT32)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    for name, array, raw in bitnet_gguf._tensors(model, "tq2_0"):
        raw_dtype, raw_shape = raw if raw is not None else (None, None)
        writer.add_tensor(name, array, raw_shape=raw_shape, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    loaded, tokenizer = bn.load_gguf(path), bn.load_gguf_tokenizer(path)
    assert loaded.config.hidden_act == "silu" and loaded.config.sub_norms
    prompt = "hello world, the quick fox"
    ids = tokenizer.encode(prompt).ids
    assert ids == [BOS_ID, *sp.encode(prompt)]
    # The CLI heals the prompt's last token ("▁fox"): generated again among the pieces that extend it.
    fox = ids[-1]
    healed = model.generate(ids[:-1], 7, stop=[], first_tokens=[i for i in range(len(tokens))
                                                                if tokens[i].startswith(tokens[fox])])
    assert main(["generate", str(path), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hello world, the quick " + tokenizer.decode(healed))

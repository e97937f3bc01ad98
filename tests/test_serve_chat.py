"""What the CLI chat and the server share: the chat format (template or plain transcript) and the
incremental detokenizer with stop strings, checked against the tokenizer's whole-text decode."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bitnet as bn
from bitnet.io.chat import chat_format, fitted
from bitnet.io.detokenize import TextStream

pytest.importorskip("tokenizers")

TEXT = "def naïve(x):\n    return '日本語' + x  # ünïcödé 🙂\nUser: again\n"


@pytest.fixture(scope="module")
def tokenizer():
    return bn.load_tokenizer()


def pieces(stream: TextStream, tokens: list[int]) -> list[str]:
    out = []
    for token in tokens:
        out.append(stream.push(token))
        if stream.stopped:
            break
    out.append(stream.flush())
    return out


def test_pieces_add_up_to_the_whole_decode(tokenizer):
    """Multi-byte characters split over tokens wait for their last byte; no piece is lost or doubled."""
    tokens = tokenizer.encode(TEXT).ids
    got = pieces(TextStream(tokenizer), tokens)
    assert "".join(got) == tokenizer.decode(tokens)
    assert not any("\ufffd" in piece for piece in got)


def test_random_tokens_add_up_to_the_whole_decode(tokenizer):
    tokens = np.random.default_rng(0).integers(0, tokenizer.get_vocab_size(), 300).tolist()
    assert "".join(pieces(TextStream(tokenizer), tokens)) == tokenizer.decode(tokens)


@pytest.mark.parametrize("stops", [["\nUser:"], ["日本"], ["return", "User"], ["🙂"], ["not in the text"]])
def test_text_is_cut_before_the_first_stop_string(tokenizer, stops):
    tokens = tokenizer.encode(TEXT).ids
    whole = tokenizer.decode(tokens)
    cut = min((whole.find(s) for s in stops if s in whole), default=len(whole))
    stream = TextStream(tokenizer, stops)
    shown = pieces(stream, tokens)
    assert "".join(shown) == whole[:cut]
    assert stream.stopped == (cut < len(whole))


def test_a_possible_stop_start_is_held_back_until_it_is_not(tokenizer):
    stop = "\nUser:"
    stream = TextStream(tokenizer, [stop])
    shown = ""
    for token in tokenizer.encode("a\nUse it").ids:
        shown += stream.push(token)
        assert not any(shown.endswith(stop[:k]) for k in range(1, len(stop))), shown
    assert shown == "a\nUse it" and not stream.stopped


def test_strip_start_drops_the_reply_s_leading_space(tokenizer):
    tokens = tokenizer.encode("   \n hello world").ids
    assert "".join(pieces(TextStream(tokenizer, strip_start=True), tokens)) == "hello world"


def test_skip_leaves_out_text_already_shown(tokenizer):
    tokens = tokenizer.encode("def main():").ids
    assert "".join(pieces(TextStream(tokenizer, skip="def"), tokens)) == " main():"


def test_stop_strings_must_be_non_empty_strings(tokenizer):
    with pytest.raises(bn.InvalidValueError, match="non-empty string"):
        TextStream(tokenizer, [""])


def test_plain_transcript_without_a_template(tokenizer):
    chat = chat_format(None, tokenizer, bn.load_pretrained().config)  # the bundled model has no template
    assert not chat.templated and chat.stop == "\nUser:"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert chat.render(messages) == tokenizer.encode("System: be brief\nUser: hi\nAssistant:").ids


def test_chat_uses_the_model_s_template_and_fits_the_context(tmp_path, tokenizer):
    config = bn.BitNetConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=0)
    template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    chat = chat_format(tmp_path, tokenizer, config)
    assert chat.templated and chat.note is None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "go on"}]
    expected = f"{tokenizer.id_to_token(1)}<user>hi<assistant>yes<user>go on<assistant>"
    assert chat.render(messages) == tokenizer.encode(expected, add_special_tokens=False).ids
    # Too long for the budget: the oldest turn pair goes first, then the oldest tokens.
    shorter = chat.render(messages[2:])
    assert fitted(messages, chat.render, len(shorter)) == shorter
    assert fitted(messages, chat.render, 3) == shorter[-3:]


def test_a_template_s_refusal_and_bad_jinja_are_checkpoint_errors(tmp_path, tokenizer):
    config = bn.load_pretrained().config
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no') }}"}))
    with pytest.raises(bn.CheckpointError, match="refuses the conversation: no"):
        chat_format(tmp_path, tokenizer, config).render([{"role": "user", "content": "x"}])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(bn.CheckpointError, match="not valid Jinja"):
        chat_format(tmp_path, tokenizer, config)


@pytest.mark.parametrize("ids", [dict(bos_token_id=10**6), dict(eos_token_id=10**6), dict(eos_token_id=[10**6, 0])])
def test_a_bos_or_eos_id_the_tokenizer_lacks_is_a_checkpoint_error(tmp_path, tokenizer, ids):
    """Not "None" rendered into every prompt by the template."""
    config = bn.BitNetConfig(**{"vocab_size": 10**6 + 1, "bos_token_id": 1, "eos_token_id": 0, **ids})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}{{ eos_token }}"}))
    name = "bos_token" if "bos_token_id" in ids else "eos_token"
    with pytest.raises(bn.CheckpointError, match=f"{name} is token 1000000, which the tokenizer does not have"):
        chat_format(tmp_path, tokenizer, config)

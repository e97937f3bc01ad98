"""Conversations as token ids: the model's chat template rendered with Jinja as transformers renders it,
or a plain ``User: ... / Assistant:`` transcript for a model without one.

Both ``python -m bitnet generate --chat`` and the server's ``/v1/chat/completions`` use
:func:`chat_format`, so a conversation reads the same to the model whichever way it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from .. import errors
from .info import read_chat_template

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
PLAIN_ROLES = {SYSTEM: "System", USER: "User", ASSISTANT: "Assistant"}  # the transcript without a chat template


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation becomes the prompt of the assistant's next turn.

    Attributes
    ----------
    render : the token ids of a list of ``{"role", "content"}`` messages, ending where the
        assistant starts speaking.
    stop : the text that begins the next user turn, where a reply ends (plain transcript);
        None with a chat template, whose replies end with an end-of-turn token.
    note : why the model's chat template is not used although it has one, else None.
    """

    render: Callable[[list[dict]], list[int]]
    stop: str | None
    note: str | None = None

    @property
    def templated(self) -> bool:
        return self.stop is None


def chat_format(model_dir, tokenizer, config) -> ChatFormat:
    """The chat format of a model: its chat template when it has one (and jinja2 is installed), else plain.

    Parameters
    ----------
    model_dir : the model's directory or .gguf file; None: the bundled model.
    tokenizer : its ``tokenizers.Tokenizer``.
    config : its :class:`bitnet.BitNetConfig` (for the template's ``bos_token`` / ``eos_token``).

    Returns
    -------
    ChatFormat

    Raises
    ------
    CheckpointError when the template is not valid Jinja or the config's BOS or EOS id is not
    a token of ``tokenizer``; ``render`` raises it when the template fails or refuses a
    conversation (its ``raise_exception``).
    """
    template = read_chat_template(model_dir)
    note = None
    if template is not None:
        try:
            import jinja2.sandbox
        except ImportError:
            note = "the model's chat template needs jinja2 (pip install jinja2); using a plain transcript"
        else:
            return ChatFormat(_template_renderer(jinja2.sandbox, template, tokenizer, config), None)

    def plain(messages: list[dict]) -> list[int]:
        turns = [f"{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages]
        return tokenizer.encode("\n".join([*turns, f"{PLAIN_ROLES[ASSISTANT]}:"])).ids

    return ChatFormat(plain, f"\n{PLAIN_ROLES[USER]}:", note)


def _special_token(tokenizer, name: str, token_id: int | None) -> str:
    """The text of the template variable ``name`` (``bos_token``/``eos_token``): token ``token_id``, "" for None.

    An id the tokenizer lacks would render as "None" in every prompt: CheckpointError instead.
    """
    if token_id is None:
        return ""
    token = tokenizer.id_to_token(token_id)
    if token is None:
        raise errors.CheckpointError(
            f"the chat template's {name} is token {token_id}, which the tokenizer does not have "
            f"({tokenizer.get_vocab_size()} tokens): fix {name}_id in config.json (or the GGUF's tokenizer.ggml keys)"
        )
    return token


def _template_renderer(sandbox, template: str, tokenizer, config) -> Callable[[list[dict]], list[int]]:
    compiled = _compiled_template(sandbox, template)
    specials = {name: _special_token(tokenizer, name, i) for name, i in
                (("bos_token", config.bos_token_id), ("eos_token", (config.stop_token_ids or [None])[0]))}

    def render(messages: list[dict]) -> list[int]:
        try:
            text = compiled.render(messages=messages, add_generation_prompt=True, **specials)
        except errors.CheckpointError:  # the template's raise_exception
            raise
        except Exception as exc:  # jinja2's errors
            raise errors.CheckpointError(f"the model's chat template fails: {exc}") from None
        return tokenizer.encode(text, add_special_tokens=False).ids  # the template has them

    return render


def _compiled_template(sandbox, template: str):
    """A chat template compiled as transformers compiles it (sandboxed, trimmed blocks, raise_exception)."""

    def raise_exception(message: str) -> NoReturn:
        raise errors.CheckpointError(f"the model's chat template refuses the conversation: {message}")

    environment = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template)
    except Exception as exc:  # jinja2.TemplateSyntaxError
        raise errors.CheckpointError(f"the model's chat template is not valid Jinja: {exc}") from None


def fitted(messages: list[dict], render: Callable[[list[dict]], list[int]], budget: int) -> list[int]:
    """The conversation's token ids within ``budget``: the oldest turns dropped, then the oldest tokens."""
    first = 0
    ids = render(messages)
    while len(ids) > budget and first + 2 < len(messages):
        first += 2  # a user turn and its reply, so that the conversation still opens with a user turn
        ids = render(messages[first:])
    return ids[-budget:]

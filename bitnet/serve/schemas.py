"""The part of OpenAI's API the server speaks: request bodies checked and read, response objects built.

Requests are plain JSON objects (checked here by hand, so that each mistake gets a message
saying which field is wrong and what it should be); responses are the dicts OpenAI's
clients parse: ``text_completion`` and ``chat.completion`` objects, their stream chunks, and
``{"error": {...}}`` bodies.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from .. import errors
from ..io.chat import ROLES

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat replies run to the context's end
MAX_STOP_STRINGS = 4  # as OpenAI

# Fields that ask for something this server does not do, with the values that ask for nothing
# (None always does): anything else is refused rather than silently ignored.
UNSUPPORTED = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "suffix": ("",),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "tools": ([],),
    "functions": ([],),
    "response_format": ({"type": "text"},),
}


@dataclass(frozen=True)
class Sampling:
    """The generation settings of a request (OpenAI's defaults where a field is absent)."""

    max_tokens: int | None  # None: up to the end of the context
    temperature: float
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | list[int]
    sampling: Sampling


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    sampling: Sampling


def parse_completion(body: object, model_name: str) -> CompletionRequest:
    """A ``/v1/completions`` body, checked.

    Raises
    ------
    InvalidValueError naming the field that is missing or wrong; UnknownModelError for
    another ``model`` than ``model_name``.
    """
    body = _checked_body(body, model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    is_ids = isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)
    if not (isinstance(prompt, str) or is_ids):
        raise errors.InvalidValueError(
            f"'prompt' must be a string or a list of token ids (one prompt per request), got {_shown(prompt)}"
        )
    return CompletionRequest(prompt, _sampling(body, "max_tokens", COMPLETION_MAX_TOKENS))


def parse_chat(body: object, model_name: str) -> ChatRequest:
    """A ``/v1/chat/completions`` body, checked; each message's content as one string. Raises as
    :func:`parse_completion`."""
    body = _checked_body(body, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise errors.InvalidValueError(f"'messages' must be a non-empty list of messages, got {_shown(messages)}")
    # Newer clients send max_completion_tokens, older ones max_tokens.
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return ChatRequest([_message(m, i) for i, m in enumerate(messages)], _sampling(body, field, None))


def _checked_body(body: object, model_name: str) -> dict:
    if not isinstance(body, dict):
        raise errors.InvalidValueError(f"the request body must be a JSON object, got {_shown(body)}")
    model = body.get("model")
    if model is not None and model != model_name:
        raise errors.UnknownModelError(
            f"the model {_shown(model)} does not exist here: this server serves {model_name!r} (see /v1/models)"
        )
    for name, allowed in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == a and isinstance(value, bool) == isinstance(a, bool)
                                         for a in allowed):
            raise errors.InvalidValueError(
                f"'{name}' = {_shown(value)} is not supported by this server; leave it out"
            )
    return body


def _message(message: object, index: int) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise errors.InvalidValueError(f"{where} must be an object with 'role' and 'content', got {_shown(message)}")
    role = message.get("role")
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    if role not in ROLES:
        raise errors.InvalidValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {_shown(role)}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise errors.InvalidValueError(f"{where}.content may only hold text parts: {{'type': 'text', 'text': ...}}")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise errors.InvalidValueError(f"{where}.content must be a string, got {_shown(content)}")
    return {"role": role, "content": content}


def _sampling(body: dict, max_tokens_field: str, default_max_tokens: int | None) -> Sampling:
    max_tokens = body.get(max_tokens_field)
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise errors.InvalidValueError(f"'{max_tokens_field}' must be an integer >= 1, got {_shown(max_tokens)}")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise errors.InvalidValueError("'top_p' must be above 0 (1 keeps every token)")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise errors.InvalidValueError(f"'seed' must be an integer >= 0, got {_shown(seed)}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise errors.InvalidValueError(f"'stream' must be true or false, got {_shown(stream)}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise errors.InvalidValueError(f"'stream_options' must be an object, got {_shown(options)}")
    return Sampling(max_tokens, temperature, None if top_p == 1 else top_p, seed, _stop(body.get("stop")), stream,
                    bool(options.get("include_usage")))


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high):
        raise errors.InvalidValueError(f"'{name}' must be a number in [{low:g}, {high:g}], got {_shown(value)}")
    return float(value)


def _stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and len(stops) <= MAX_STOP_STRINGS
            and all(isinstance(s, str) and s for s in stops)):
        raise errors.InvalidValueError(
            f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, got {_shown(stop)}"
        )
    return tuple(stops)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: object) -> str:
    """A value as a message quotes it: as JSON would spell it, cut to a readable length."""
    return f"{value!r:.80}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class Reply:
    """The response to one request: whole, or as the chunks of a stream. Subclasses give the choice shapes."""

    object_name: str
    chunk_name: str
    id_prefix: str

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def whole(self, text: str, finish_reason: str, token_counts: dict[str, int]) -> dict:
        return {**self._envelope(self.object_name, [self._choice(text, finish_reason)]), "usage": token_counts}

    def chunk(self, text: str, finish_reason: str | None = None) -> dict:
        return self._envelope(self.chunk_name, [self._delta(text, finish_reason)])

    def opening(self) -> dict | None:
        """The stream's first chunk, before any text, if the API has one."""
        return None

    def usage_chunk(self, token_counts: dict[str, int]) -> dict:
        """The stream's last chunk when the client asked for usage: no choices, the token counts."""
        return {**self._envelope(self.chunk_name, []), "usage": token_counts}

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def _choice(self, text: str, finish_reason: str | None) -> dict:
        raise NotImplementedError

    def _delta(self, text: str, finish_reason: str | None) -> dict:
        raise NotImplementedError


class CompletionReply(Reply):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def _choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    _delta = _choice  # a completion's stream chunk has the whole response's shape


class ChatReply(Reply):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def opening(self) -> dict:
        return self._envelope(self.chunk_name, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}])

    def _choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def _delta(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                "finish_reason": finish_reason}

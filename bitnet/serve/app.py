"""The HTTP side of the server: an ASGI app (Starlette) speaking OpenAI's API in front of an :class:`Engine`.

Each request is checked (:mod:`bitnet.serve.schemas`), turned into token ids (the prompt, or
the conversation through the model's chat template) and submitted to the engine; the
engine's outputs come back through an asyncio queue and leave as one JSON response or as
server-sent events. A client that goes away cancels its request, which frees its batch slot
at the next step. Every error leaves as OpenAI's ``{"error": {...}}`` with its status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import errors
from ..io.chat import ChatFormat
from . import schemas
from .engine import Engine
from .scheduler import Output, Sequence

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 2**20  # a request body past this is refused (413) before it is read whole
CLIENT_CLOSED_REQUEST = 499  # the status logged for a client that left before its response (as nginx)

# The status, OpenAI error type and code of each library error a request can meet (first match wins).
ERROR_STATUS = [
    (errors.ContextLengthError, 413, "invalid_request_error", "context_length_exceeded"),
    (errors.UnknownModelError, 404, "invalid_request_error", "model_not_found"),
    (errors.OverloadedError, 503, "server_error", "overloaded"),
    (errors.BitNetError, 400, "invalid_request_error", None),
]


def create_app(engine: Engine, tokenizer, chat: ChatFormat, model_name: str, api_key: str | None = None) -> Starlette:
    """The ASGI app of the OpenAI-compatible API; it starts ``engine`` at startup and closes it at shutdown.

    Parameters
    ----------
    engine : the engine (not started yet) that generates for every request.
    tokenizer : the model's ``tokenizers.Tokenizer``.
    chat : how conversations become prompts (:func:`bitnet.io.chat.chat_format`).
    model_name : the name clients give as ``model`` (listed by ``/v1/models``).
    api_key : when given, every request must carry ``Authorization: Bearer <api_key>``.

    Returns
    -------
    starlette.applications.Starlette : run it with uvicorn (see :func:`bitnet.serve.serve`).
    """
    api = _OpenAIRoutes(engine, tokenizer, chat, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(engine.start)  # the warm-up compiles kernels: seconds, off the loop
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.close)

    return Starlette(
        routes=[
            Route("/health", api.health),
            Route("/v1/models", api.models),
            Route("/v1/models/{name:path}", api.model),
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        ],
        middleware=[Middleware(_RequireKey, key=api_key)] if api_key else [],
        exception_handlers={HTTPException: _http_error, errors.BitNetError: _library_error, Exception: _server_error},
        lifespan=lifespan,
    )


class _OpenAIRoutes:
    """The endpoints, sharing the engine, tokenizer, chat format and model name."""

    def __init__(self, engine: Engine, tokenizer, chat: ChatFormat, model_name: str) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat = chat
        self.model_name = model_name

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "requests": self.engine.outstanding})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name != self.model_name:
            raise errors.UnknownModelError(f"the model {name!r} does not exist here: this server serves "
                                           f"{self.model_name!r}")
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        parsed = schemas.parse_completion(await _json_body(request), self.model_name)
        prompt = parsed.prompt
        ids = self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else prompt
        if not ids:
            raise errors.InvalidValueError("the prompt encodes to no tokens: give some text")
        return await self._generate(request, schemas.CompletionReply(self.model_name), ids, parsed.sampling)

    async def chat_completions(self, request: Request) -> Response:
        parsed = schemas.parse_chat(await _json_body(request), self.model_name)
        ids = self.chat.render(parsed.messages)
        stop = parsed.sampling.stop if self.chat.templated else (*parsed.sampling.stop, self.chat.stop)
        # After a plain transcript's "Assistant:" the reply starts with a space that is not its own.
        return await self._generate(request, schemas.ChatReply(self.model_name), ids, parsed.sampling, stop,
                                    strip_start=not self.chat.templated)

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "bitnet"}

    async def _generate(self, request: Request, reply: schemas.Reply, ids: list[int], sampling: schemas.Sampling,
                        stop: tuple[str, ...] | None = None, strip_start: bool = False) -> Response:
        max_tokens = sampling.max_tokens
        if max_tokens is None:  # a chat reply without a limit: up to the end of the context
            max_tokens = self.engine.context - len(ids)
            if max_tokens < 1:
                raise errors.ContextLengthError(
                    f"the conversation's {len(ids)} tokens fill the context of {self.engine.context} tokens: "
                    f"shorten it"
                )
        outputs = _Outputs()
        sequence = self.engine.submit(
            ids, max_tokens, outputs.emit, temperature=sampling.temperature, top_p=sampling.top_p,
            seed=sampling.seed, stop=sampling.stop if stop is None else stop, strip_start=strip_start,
        )
        if sampling.stream:
            events = _events(reply, outputs, sequence, len(ids), sampling.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _whole(request, reply, outputs, sequence, len(ids))


class _Outputs:
    """One request's outputs, handed from the engine thread to the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Output] = asyncio.Queue()

    def emit(self, output: Output) -> None:
        """Called on the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, output)

    async def __aiter__(self) -> AsyncIterator[Output]:
        while True:
            output = await self.queue.get()
            yield output
            if output.last:
                return


async def _whole(request: Request, reply: schemas.Reply, outputs: _Outputs, sequence: Sequence,
                 prompt_tokens: int) -> Response:
    """The response as one JSON object, once the sequence has ended.

    A client that disconnects first cancels its request, and is sent nothing (499 in the log).
    """
    collecting = asyncio.ensure_future(_collected(outputs))
    disconnected = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({collecting, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        collecting.cancel()
        disconnected.cancel()
        sequence.cancel()  # a no-op once it has ended
    if collecting.cancelled():
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    text, last = collecting.result()  # raises the error that ended the sequence, if one did
    return JSONResponse(reply.whole(text, last.finish_reason, schemas.usage(prompt_tokens, last.completion_tokens)))


async def _collected(outputs: _Outputs) -> tuple[str, Output]:
    """The whole text of a request's outputs, and its last output."""
    pieces = []
    async for output in outputs:
        if output.error is not None:
            raise output.error
        pieces.append(output.text)
    return "".join(pieces), output


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read: nothing else arrives before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(reply: schemas.Reply, outputs: _Outputs, sequence: Sequence, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    """The response as server-sent events, ending with ``data: [DONE]``.

    When the client disconnects, Starlette cancels this generator at its ``await``: the
    ``finally`` cancels the request.
    """
    try:
        opening = reply.opening()
        if opening is not None:
            yield _event(opening)
        async for output in outputs:
            if output.error is not None:
                _, kind, code = _status_of(output.error)
                yield _event(schemas.error_body(str(output.error), kind, code))
                return
            if output.text or output.finish_reason:
                yield _event(reply.chunk(output.text, output.finish_reason))
        if include_usage:
            yield _event(reply.usage_chunk(schemas.usage(prompt_tokens, output.completion_tokens)))
        yield "data: [DONE]\n\n"
    finally:
        sequence.cancel()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _json_body(request: Request) -> object:
    """The request's body as JSON; 400 when it is not JSON, 413 past MAX_BODY_BYTES."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise errors.InvalidValueError(f"the request body is not valid JSON ({exc})") from None


def _status_of(exc: Exception) -> tuple[int, str, str | None]:
    """The HTTP status, OpenAI error type and code of an exception."""
    for kind, status, error_type, code in ERROR_STATUS:
        if isinstance(exc, kind):
            return status, error_type, code
    return 500, "server_error", None


async def _library_error(request: Request, exc: Exception) -> Response:
    status, kind, code = _status_of(exc)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(schemas.error_body(str(exc), kind, code), status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == 404:
        message = f"there is no {request.url.path} here: the API is under /v1 (models, completions, chat/completions)"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return JSONResponse(schemas.error_body(message, "invalid_request_error"), exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("request failed", exc_info=exc)
    return JSONResponse(schemas.error_body(f"the server failed: {exc}", "server_error"), 500)


class _RequireKey:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <key>``; 401 otherwise."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = schemas.error_body("a valid API key is required: send the header 'Authorization: Bearer "
                                          "<key>' with the key the server was started with", "invalid_request_error",
                                          "invalid_api_key")
                await JSONResponse(body, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)

"""``serve()``: load a model and run the OpenAI-compatible server with uvicorn (``python -m bitnet serve``)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from .. import errors
from ..choices import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK
from ..io import load_pretrained, load_tokenizer
from ..io.chat import chat_format
from .app import create_app
from .engine import Engine

API_KEY_ENV = "BITNET_API_KEY"
STARTUP_SECONDS = 300  # the engine's warm-up compiles kernels on a cold Numba cache
SHUTDOWN_GRACE_SECONDS = 10  # on Ctrl-C, streams still open after this are cut
BUNDLED_MODEL_NAME = "bitnet-bundled"


def model_name_of(path: str | Path | None) -> str:
    """The name a model is served under: its directory's or file's name; ``bitnet-bundled`` for the bundled one."""
    if path is None:
        return BUNDLED_MODEL_NAME
    path = Path(path)
    return (path.stem if path.suffix.lower() == ".gguf" else path.resolve().name) or str(path)


def serve(
    model_path: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_context: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    threads: int | None = None,
    head_dtype: str = "auto",
) -> None:
    """Serve a model over OpenAI's API until interrupted (Ctrl-C).

    Parameters
    ----------
    model_path : HF model directory or .gguf file; None: the bundled model.
    host, port : where to listen; the default host takes connections from this machine only.
    api_key : require ``Authorization: Bearer <api_key>`` on every request; None: the
        ``BITNET_API_KEY`` environment variable if set, else no key.
    model_name : the ``model`` clients name; default :func:`model_name_of` the path.
    max_batch, max_queue, max_context, prefill_chunk, threads : those of :class:`Engine`.
    head_dtype : embedding/head storage, as :func:`bitnet.load_pretrained`.

    Raises
    ------
    CheckpointNotFoundError when the model has no tokenizer; what the loaders and
    :class:`Engine` raise for a bad model or setting, before anything listens.
    """
    model = load_pretrained(model_path, head_dtype=head_dtype)
    tokenizer = load_tokenizer(model_path)
    if tokenizer is None:
        raise errors.CheckpointNotFoundError(f"{model_path} has no tokenizer.json: the server needs one for text")
    chat = chat_format(model_path, tokenizer, model.config)
    if chat.note:
        print(f"note: {chat.note}", file=sys.stderr)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_context=max_context,
                    prefill_chunk=prefill_chunk, threads=threads)
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    name = model_name or model_name_of(model_path)
    app = create_app(engine, tokenizer, chat, name, api_key)
    print(f"serving {name} at http://{host}:{port}/v1 (batches of up to {engine.scheduler.max_batch}, "
          f"context {engine.context}, {'an API key' if api_key else 'no API key'})", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread until the block ends; yields the base URL.

    For notebooks, tests and benchmarks that talk to a server in their own process. Port 0
    takes a free port.

    Raises
    ------
    OSError when the address cannot be bound; RuntimeError when the app fails to start.
    """
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.05)
        yield f"http://{f'[{host}]' if ':' in host else host}:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        listener.close()

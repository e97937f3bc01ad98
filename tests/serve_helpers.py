"""A real server for the serve tests: uvicorn on a free localhost port, in a thread of the test process
(so the tests can look at its engine and arena), with the bundled model."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import bitnet as bn

API_KEY = "sk-test-key"
MODEL_NAME = "bitnet-bundled"


@dataclass
class RunningServer:
    url: str  # the API's base URL, ending in /v1
    engine: object
    model: object
    tokenizer: object
    batch_sizes: list[int]  # len(sequences) of every forward_batch the engine ran

    def client(self, **options):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=API_KEY, **{"max_retries": 0, "timeout": 60, **options})


@contextlib.contextmanager
def running_server(max_batch: int = 4, max_queue: int = 4, chat_dir=None, **engine_options) -> Iterator[RunningServer]:
    """Serve the bundled model until the block ends; every forward_batch call is recorded.

    ``chat_dir``: a directory whose ``tokenizer_config.json`` gives the chat template (default: none).
    """
    from bitnet.io.chat import chat_format
    from bitnet.serve import Engine, create_app
    from bitnet.serve.server import running

    model, tokenizer = bn.load_pretrained(), bn.load_tokenizer()
    batch_sizes: list[int] = []
    forward_batch = model.forward_batch

    def recorded(sequences, caches, out=None):
        batch_sizes.append(len(sequences))
        return forward_batch(sequences, caches, out)

    model.forward_batch = recorded
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, **engine_options)
    app = create_app(engine, tokenizer, chat_format(chat_dir, tokenizer, model.config), MODEL_NAME, API_KEY)
    with running(app) as url:
        yield RunningServer(f"{url}/v1", engine, model, tokenizer, batch_sizes)


def wait_until(condition, seconds: float = 30) -> bool:
    """Poll ``condition()`` until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True

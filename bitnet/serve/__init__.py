"""An OpenAI-compatible server with continuous batching (``python -m bitnet serve``; the ``[serve]`` extra).

``Scheduler`` advances many sequences with one batched forward pass per step; ``Engine`` runs
it on a background thread; ``create_app`` is the ASGI app (Starlette) in front of it;
``serve`` runs that app with uvicorn, and ``running`` does so on a background thread (for
notebooks, tests and benchmarks). Names load on first use, so the scheduler and engine need
neither Starlette nor uvicorn.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:  # the lazy names spelled out for type checkers, IDEs and the API docs; never run
    from .app import create_app
    from .engine import Engine
    from .scheduler import Output, Scheduler, Sequence
    from .server import running, serve

_HOMES = {
    "create_app": "app",
    "Engine": "engine",
    "Output": "scheduler", "Scheduler": "scheduler", "Sequence": "scheduler",
    "running": "server", "serve": "server",
}

__all__ = ["Engine", "Output", "Scheduler", "Sequence", "create_app", "running", "serve"]


__getattr__, __dir__ = lazy_names(__name__, _HOMES)

"""An OpenAI-compatible server with continuous batching (``python -m bitnet serve``; the ``[serve]`` extra).

``Scheduler`` advances many sequences with one batched forward pass per step; ``Engine`` runs
it on a background thread; ``create_app`` is the ASGI app (Starlette) in front of it and
``serve`` runs that app with uvicorn. Names load on first use, so the scheduler and engine
need neither Starlette nor uvicorn.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:  # the lazy names spelled out for type checkers, IDEs and the API docs; never run
    from .app import create_app
    from .engine import Engine
    from .scheduler import Output, Scheduler, Sequence
    from .server import serve

_HOMES = {
    "create_app": "app",
    "Engine": "engine",
    "Output": "scheduler", "Scheduler": "scheduler", "Sequence": "scheduler",
    "serve": "server",
}

__all__ = ["Engine", "Output", "Scheduler", "Sequence", "create_app", "serve"]


__getattr__, __dir__ = lazy_names(__name__, _HOMES)

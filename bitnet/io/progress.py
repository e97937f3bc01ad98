"""Progress of a loader: how many of a model's weights have been read."""

from __future__ import annotations

from collections.abc import Callable

from .. import errors

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each weight is read."""


class ReportingDict(dict):
    """The weights a loader gathers: each new entry reports ``progress(len(self), total)``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        errors.check_callback(progress, "progress")
        super().__init__()
        self.total = total
        self.progress = progress

    def __setitem__(self, name: str, value: object) -> None:
        super().__setitem__(name, value)
        if self.progress is not None:
            self.progress(len(self), self.total)

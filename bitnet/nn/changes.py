"""A count of the assignments made to the layers' attributes.

Layers are plain objects with public attributes (``linear.to("metal")`` sets ``device``, a
user may give a norm new gains), so a compiled copy of them (``bitnet.models.compiled``)
must learn that they changed. Every layer class derives from :class:`Tracked`, whose
attribute assignments add one to a single count: a copy made at count ``c`` is stale once
:func:`count` is no longer ``c``. Assignments happen when layers are built or changed,
never in a forward step, so the count stands still while a model runs.
"""

from __future__ import annotations

_assignments = 0


class Tracked:
    """A class whose instances' attribute assignments are counted."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        global _assignments
        super().__setattr__(name, value)
        _assignments += 1  # after the assignment: a copy that read the count first sees it as stale


def count() -> int:
    """How many attribute assignments layers have seen in this process."""
    return _assignments

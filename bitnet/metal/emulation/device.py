"""A stand-in for the ``metalcompute`` module that runs the kernels with the CPU emulation.

It has metalcompute 0.2.9's surface as the bridge uses it: ``Device()``, ``Device.kernel(source)
.function(name)``, ``Device.buffer(nbytes or array)``, and ``function(count, *buffers)`` returning
a handle. As with metalcompute, the threadgroup width is fixed per pipeline (here: chosen when
the module is made), ``count`` is rounded up to whole threadgroups whose extra threads run too,
and an argument that is not a Buffer is copied into a fresh one for that call only.

Every read and write a kernel makes through a buffer pointer is checked against the buffer's
size (``msl_emu::pointer``), and a dispatch that made one outside raises. Buffers also keep
16 KiB of guard bytes on each side (as far as the threads past ``count`` of a 1024-wide
threadgroup reach with 16-byte elements), and a dispatch that wrote into them raises too: that
catches a write through a plain address taken of a buffer element (``&out[i]``), which the
pointer cannot check.
As on Apple GPUs, making a function whose threadgroup variables exceed 32 KiB raises.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from .compiler import EmulatedLibrary, EmulationError, load

GUARD_BYTES = 16 * 1024
GUARD_VALUE = 0xA5


class Buffer(np.ndarray):
    """Device memory: a writable uint8 array (so ``np.frombuffer(buf, dtype)`` views it) between guards."""

    def __new__(cls, nbytes: int):
        raw = np.full(GUARD_BYTES + nbytes + GUARD_BYTES, GUARD_VALUE, np.uint8)
        raw[GUARD_BYTES : GUARD_BYTES + nbytes] = 0
        buffer = raw[GUARD_BYTES : GUARD_BYTES + nbytes].view(cls)
        buffer.guarded = raw
        return buffer

    @property
    def guards_intact(self) -> bool:
        guards = np.concatenate([self.guarded[:GUARD_BYTES], self.guarded[-GUARD_BYTES:]])
        return bool((guards == GUARD_VALUE).all())


class Function:
    """One kernel of a compiled library; calling it dispatches ``count`` threads synchronously."""

    def __init__(self, library: EmulatedLibrary, name: str, width: int, reverse: bool) -> None:
        library.check_pipeline(name)
        self.library, self.name, self.width, self.reverse = library, name, width, reverse

    def __call__(self, count: int, *arguments) -> object:
        buffers = [a if isinstance(a, Buffer) else _copied(a) for a in arguments]
        self.library.run(self.name, int(count), [(b.ctypes.data, b.nbytes) for b in buffers], self.width,
                         self.reverse)
        for i, b in enumerate(buffers):
            if not b.guards_intact:
                raise EmulationError(f"kernel {self.name} wrote outside buffer {i} ({b.nbytes} bytes)")
        return _Handle()


class Kernel:
    def __init__(self, source: str, width: int, reverse: bool) -> None:
        self._library = load(source)
        self._width, self._reverse = width, reverse

    def function(self, name: str) -> Function:
        return Function(self._library, name, self._width, self._reverse)


class Device:
    """The emulated GPU; ``width`` and ``reverse`` come from :func:`metalcompute_module`."""

    def __init__(self, width: int = 1024, reverse: bool = False) -> None:
        self.width, self.reverse = width, reverse

    def kernel(self, source: str) -> Kernel:
        return Kernel(source, self.width, self.reverse)

    def buffer(self, data) -> Buffer:
        return Buffer(int(data)) if isinstance(data, (int, np.integer)) else _copied(data)


class _Handle:
    """What metalcompute returns from a dispatch; the emulation has already finished when it exists."""


def _copied(data) -> Buffer:
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    buffer = Buffer(raw.nbytes)
    buffer[:] = raw
    return buffer


def metalcompute_module(width: int = 1024, reverse: bool = False) -> SimpleNamespace:
    """A module-like object with ``Device`` and ``Buffer``, whose kernels run in the emulation.

    Parameters
    ----------
    width : threadgroup width every pipeline gets (a multiple of 32, at most 1024), standing in
        for the pipeline's maximum that metalcompute uses.
    reverse : run the lanes of a threadgroup in reverse order between barriers (a result that
        changes with the order reveals a data race).
    """
    return SimpleNamespace(Device=lambda *args: Device(width, reverse), Buffer=Buffer)

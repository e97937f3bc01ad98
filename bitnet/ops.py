"""Ternary matmul: validate inputs once, quantize activations, run the integer kernel, scale.

The kernels (``bitnet.kernels.matmul``) need the weights in their path's layout (``i2x16`` on
AVX-512 VNNI, ``i2`` elsewhere: ``WEIGHT_FORMAT`` for the path in use) and an int8 activation
buffer zero-padded to a whole number of 256-weight blocks. This module turns whatever the
caller gives into exactly that, then hands plain arrays to one Numba call.

Kernel path: chosen at import from the CPU's features (``avx512vnni``, ``avxvnni``,
``avx2``, else ``portable``); ``BITNET_KERNEL=<path>`` forces one (see
``bitnet.kernels.cpu_features``). ``KERNEL_PATH`` says which one is in use.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections.abc import Iterable

import numba
import numpy as np

from . import backends, errors
from .formats import PackedTernary, check_packed, kernel_layout
from .kernels import cpu_features
from .kernels import matmul as kernels
from .kernels.ternary_blocks import BLOCK
from .memory import Arena, huge_pages

try:
    KERNEL_PATH = cpu_features.selected_path()
except ValueError as bad_setting:  # a BITNET_KERNEL value this machine cannot honour
    raise errors.InvalidValueError(str(bad_setting)) from None
_RUNNABLE = cpu_features.supported_paths()
WEIGHT_FORMAT = kernels.WEIGHT_FORMATS[KERNEL_PATH]
"""The packing format the CPU kernels of ``KERNEL_PATH`` read; layers keep their weights in it."""
_PREPARED = "matmul"  # key in PackedTernary.cache, with the format, for the arrays the kernels take
# Placeholders for the kernel arguments one operation does not use (same types as the used ones,
# so both operations share one compiled kernel).
_NO_X = np.empty((0, 0), np.float32)
_NO_SCALE = np.empty(0, np.float32)
_NO_OUT = np.empty((0, 0), np.float32)
_MAX_K = 2**24 - 1  # at 2**24 features, 2**24 x (-128) x (-1) = 2**31 no longer fits in int32
_OPENMP_RUNTIMES = ("libgomp.so.1", "libomp.so", "libiomp5.so", "libomp.dylib", "libiomp5.dylib")
_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: end the workers, keep nothing else
_WORKSPACE_SHAPES = 4  # workspaces kept per thread; a model needs one per (tokens, in_features) pair

WORKSPACE_ARENA = Arena()
"""Where matmul's temporaries come from (its stats show what matmul holds).

A separate arena: workspaces outlive any caller's ``frame()``, which would otherwise release them."""


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in the matmul kernels (and every other Numba parallel kernel).

    A thin wrapper over ``numba.set_num_threads``: the setting is per calling thread, and
    results are bit-identical whatever it is.

    Parameters
    ----------
    n : int, the number of threads.

    Raises
    ------
    InvalidValueError unless ``1 <= n <= numba.config.NUMBA_NUM_THREADS`` (the pool size,
    set with the ``NUMBA_NUM_THREADS`` environment variable before import).
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
        raise errors.InvalidValueError(f"the number of threads must be an integer in [1, {limit}], got {n!r}")
    numba.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads the matmul kernels use (``numba.get_num_threads``)."""
    return numba.get_num_threads()


def release_worker_threads() -> bool:
    """End the worker threads that this thread's parallel kernels started, until it runs another.

    With Numba's ``omp`` threading layer, each thread that runs a parallel kernel keeps its own
    pool of OpenMP workers. Once the runtime manages more threads than there are CPUs (a model
    built on the main thread, then run on a server's engine thread), GNU OpenMP stops spinning
    between parallel regions, and every region waits for its workers to wake: a decode step of
    2B4T took 30-40% longer on a second thread than on the first. Call this on a thread that is
    done with kernels before another takes over (``bitnet.serve.Engine`` does it on the thread
    that creates it). Results never depend on it.

    Returns
    -------
    bool : True where the OpenMP runtime released its pool (or had none to release: no parallel
    kernel has run on this thread); False with another threading layer, or an OpenMP runtime
    without ``omp_pause_resource_all`` (OpenMP 5.0).

    Examples
    --------
    >>> model = bn.load_pretrained()  # parallel kernels on this thread  # doctest: +SKIP
    >>> bn.release_worker_threads()  # before a worker thread runs the model  # doctest: +SKIP
    True
    """
    # The layer is known: importing the kernels started Numba's pool (bitnet/kernels/__init__.py).
    if numba.threading_layer() != "omp" or not hasattr(os, "RTLD_NOLOAD"):  # RTLD_NOLOAD: POSIX only
        return False
    for name in _OPENMP_RUNTIMES:
        try:
            runtime = ctypes.CDLL(name, mode=os.RTLD_NOLOAD)  # only the runtime already loaded
            return runtime.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
        except (OSError, AttributeError):
            continue
    return False


def _kernel_weights(w: PackedTernary, path: str = KERNEL_PATH) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The payload in ``path``'s layout, the scale as a flat float32 array, the scale's step per
    output row, and the padded features (a multiple of 256).

    Weights in another format are repacked once (``formats.kernel_layout``); this tuple is
    kept in ``w.cache`` too, which saves the checks on every later call. A PackedTernary cannot
    change (its payload and scale are read-only, its shape fixed), so the cached tuple stays
    right. Its payload is C-contiguous, read-only (one array type for the kernels), of the
    format's shape and free of the 2-bit value 3: ``PackedTernary`` checked all of it.
    """
    if type(w) is not PackedTernary:
        check_packed(w)
    key = (_PREPARED, kernels.WEIGHT_FORMATS[path])
    prepared = w.cache.get(key)
    if prepared is not None:
        return prepared
    if w.shape[1] > _MAX_K:
        raise errors.ShapeError(f"matmul supports up to {_MAX_K} input features (exact int32 sums), got {w.shape[1]}")
    prepared = (kernel_layout(w, key[1]).data, w.scale.reshape(-1), 1 if w.granularity == "channel" else 0,
                -(-w.shape[1] // BLOCK) * BLOCK)
    w.cache[key] = prepared
    return prepared


def gather_kernel_weights(weights: Iterable[PackedTernary], parts: Iterable[PackedTernary] = (),
                          path: str = KERNEL_PATH) -> None:
    """Move the payloads the kernels of ``path`` read for ``weights`` (their layout, as
    ``_kernel_weights`` prepares it) into one buffer on huge pages, those not there already;
    nothing where the OS has no huge pages (``huge_pages.AVAILABLE``).

    The same bytes in other memory: a decode step streams them 3.5-7% faster
    (``bitnet.memory.huge_pages``). Each payload moves once, whichever object holds it (the
    weight itself, or the layout cached in its ``cache``), and so do the ``parts`` that view it
    (the row views ``BitLinear.stacked`` leaves its layers), so that its old memory goes back
    before the next one is copied, unless something else still holds it.
    """
    if not huge_pages.AVAILABLE:
        return
    key = (_PREPARED, kernels.WEIGHT_FORMATS[path])
    moving: dict[int, tuple[PackedTernary, list[PackedTernary]]] = {}
    for w in weights:
        _kernel_weights(w, path)
        holder = kernel_layout(w, key[1])
        if not huge_pages.on_huge_pages(holder.data):
            moving.setdefault(id(holder), (holder, []))[1].append(w)
    parts = list(parts)
    slots = huge_pages.empty_arrays([(h.data.shape, h.data.dtype) for h, _ in moving.values()]) if moving else []
    for (holder, users), slot in zip(moving.values(), slots, strict=True):
        _move_payload(holder, [*users, *parts], slot, key)
        huge_pages.return_free_memory()


def _move_payload(holder: PackedTernary, users: list[PackedTernary], slot: np.ndarray, key: tuple) -> None:
    """Copy ``holder``'s payload into ``slot`` and hold it there, with the ``users`` that view it or
    cache a layout in it (``key``)."""
    old = holder.data
    slot[...] = old
    slot.flags.writeable = False
    for user in users:
        view = user.data
        if user is not holder and np.may_share_memory(view, old):
            start = view.ctypes.data - old.ctypes.data
            user._hold_in(slot.reshape(-1)[start : start + view.nbytes].reshape(view.shape))
    holder._hold_in(slot)
    for user in users:
        prepared = user.cache.get(key)
        if prepared is not None and np.may_share_memory(prepared[0], old):
            user.cache[key] = (kernel_layout(user, key[1]).data, *prepared[1:])


_Workspace = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]


def _release(workspaces: Iterable[_Workspace]) -> None:
    """Give every buffer of ``workspaces`` back to ``WORKSPACE_ARENA``."""
    for q, act_scale, q_sum, scratch in workspaces:
        for array in (q, act_scale, q_sum, *scratch):
            WORKSPACE_ARENA.release(array)


class _ThreadWorkspaces:
    """One thread's ``(n, k_padded, path)`` -> workspace, oldest first.

    When the thread ends, Python drops its thread-local data and the finalizer gives the
    buffers back to the arena, which would otherwise count them as live for the rest of the
    process (a server's engine thread, a worker pool's threads). A ``weakref.finalize``, not
    ``__del__``: it runs at exit too, before the module's globals are torn down.
    """

    def __init__(self) -> None:
        self.by_shape: dict[tuple[int, int, str], _Workspace] = {}
        weakref.finalize(self, _release, self.by_shape.values())  # a live view: the buffers held at the end


class _Workspaces(threading.local):
    """Per thread: the matmul workspaces of that thread."""

    def __init__(self) -> None:
        self.thread = _ThreadWorkspaces()


_workspaces = _Workspaces()


def _workspace(n: int, k_padded: int, path: str) -> _Workspace:
    """Temporaries of one matmul: int8 activations ``(n, k_padded)``, their scales and sums, kernel scratch.

    The scratch is what ``bitnet.kernels.matmul.scratch_shapes`` lists for ``path`` (GEMM sums,
    the portable path's int16 copy of the activations, AMX tiles and codes). Taken from
    ``WORKSPACE_ARENA`` on the first call of a shape and path and kept for the next call of
    that shape and path on this thread (the oldest of more than ``_WORKSPACE_SHAPES`` goes
    back to the arena): repeated matmuls pay a dict lookup, not an arena round trip, and the
    kernels allocate nothing, so with ``out=`` a repeated call allocates nothing on every path
    and batch size (``tests/test_arena_use.py`` measures each). Nothing needs clearing: the
    kernel writes every element that reaches a result before reading it, zero padding included.
    """
    cached = _workspaces.thread.by_shape
    key = (n, k_padded, path)
    buffers = cached.get(key)
    if buffers is None:
        if len(cached) == _WORKSPACE_SHAPES:
            _release([cached.pop(next(iter(cached)))])
        buffers = cached[key] = (
            WORKSPACE_ARENA.empty((n, k_padded), np.int8),
            WORKSPACE_ARENA.empty(n, np.float32),
            WORKSPACE_ARENA.empty(n, np.int32),
            tuple(WORKSPACE_ARENA.empty(shape, dtype) for shape, dtype in kernels.scratch_shapes(path, n, k_padded)),
        )
    return buffers


def _kernel_path(path: str | None) -> str:
    """``path``, or ``KERNEL_PATH`` for None, checked to be a path this CPU runs.

    Raises InvalidValueError for a name that is not a path, or a path this CPU cannot run
    (its instructions would not compile, or would kill the process).
    """
    if path is None:
        return KERNEL_PATH
    errors.check_choice("kernel path", path, cpu_features.PATHS)
    if path not in _RUNNABLE:
        raise errors.InvalidValueError(
            f"kernel path {cpu_features.unsupported_reason(path)}; this machine runs: {', '.join(_RUNNABLE)}"
        )
    return path


def matmul_int(q: np.ndarray, w: PackedTernary, *, path: str | None = None) -> np.ndarray:
    """Exact int32 accumulators ``q @ codes.T`` of int8 activations and ternary weights.

    Parameters
    ----------
    q : ndarray of int8, shape ``(k,)`` or ``(..., k)`` (leading dimensions are tokens).
    w : PackedTernary of shape ``(m, k)``, in any format. Formats other than ``i2`` are
        repacked to ``i2`` on first use and the result is cached in ``w.cache``.
    path : kernel path to use instead of ``KERNEL_PATH`` (for tests and benchmarks).

    Returns
    -------
    ndarray of int32, shape ``(m,)`` or ``(..., m)``: every value exact.

    Raises
    ------
    DTypeError for activations that are not int8 or weights that are not a PackedTernary;
    ShapeError when the last axis of ``q`` is not ``k`` or ``k >= 2**24``; FormatError for
    group-wise scales; InvalidValueError for an unknown ``path`` or one this CPU cannot run.
    """
    path = _kernel_path(path)
    data, _, _, k_padded = _kernel_weights(w, path)
    q = np.asarray(q)
    errors.check_dtype(q, "activations", [np.int8])
    m, k = w.shape
    rows = np.ascontiguousarray(errors.token_rows(q, "activations", k))
    n = rows.shape[0]
    acc = np.empty((n, m), np.int32)
    if n:
        padded, _, q_sum, scratch = _workspace(n, k_padded, path)
        padded[:, :k] = rows
        padded[:, k:] = 0
        np.sum(rows, axis=1, dtype=np.int32, out=q_sum)
        kernels.ENTRY_POINTS[path](_NO_X, data, padded, _NO_SCALE, q_sum, _NO_SCALE, 0, acc, _NO_OUT, False, *scratch)
    return acc.reshape(q.shape[:-1] + (m,))


def matmul(x: np.ndarray, w: PackedTernary, out: np.ndarray | None = None, device: str = "cpu",
           *, path: str | None = None) -> np.ndarray:
    """``x @ W.T`` the BitNet b1.58 way: int8 per-token activations times ternary weights.

    Each row of ``x`` is quantized to int8 (``bn.quantize_activations``: scale ``a``), the
    products are accumulated exactly in int32, and the result is ``acc / a * s`` in
    float32 (``s`` the weight scale, per tensor or per output row). Quantization runs
    inside the same compiled call as the matmul.

    Parameters
    ----------
    x : ndarray of float, shape ``(k,)`` or ``(..., k)``; converted to float32.
        Non-contiguous arrays are accepted (copied).
    w : PackedTernary of shape ``(m, k)``, in any format. Formats other than ``i2`` are
        repacked to ``i2`` on first use and the result is cached in ``w.cache``.
    out : optional float32 C-contiguous array of the result's shape to write into.
    device : "cpu", or another backend of ``bn.devices()`` to run it there.
    path : kernel path to use instead of ``KERNEL_PATH`` (for tests and benchmarks).

    Returns
    -------
    ndarray of float32, shape ``(m,)`` or ``(..., m)`` (``out`` when given). A row of ``x``
    holding NaN or Inf gives a row of NaN. No tokens (``x`` of shape ``(0, k)``) give an empty
    ``(0, m)`` result, as numpy does; weights with ``m = 0`` or ``k = 0`` cannot be made.

    Raises
    ------
    DTypeError for non-float ``x``, a wrong ``out`` dtype or weights that are not a
    PackedTernary; ShapeError when the last axis of ``x`` is not ``k`` or ``out`` has the
    wrong shape or is not C-contiguous; FormatError for group-wise weight scales
    (``granularity="group"`` is not supported by matmul); DeviceError for an unknown or
    unavailable device; InvalidValueError for an unknown ``path`` or one this CPU cannot run.
    """
    if not (isinstance(device, str) and device == backends.CPU):
        errors.check_choice("device", device, (backends.CPU, *backends.BACKENDS), errors.DeviceError)
        return backends.get_backend(device).matmul(x, w, out=out)
    path = _kernel_path(path)
    _kernel_weights(w, path)  # checks w before x (and caches its kernel arrays for matmul_rows)
    x = np.asarray(x)
    errors.check_float(x, "activations")
    m, k = w.shape
    rows = np.ascontiguousarray(errors.token_rows(x, "activations", k))
    if rows.dtype != np.float32:
        rows = rows.astype(np.float32)
    result = errors.checked_out(out, x.shape[:-1] + (m,))
    matmul_rows(rows, w, result.reshape(rows.shape[0], m), path)
    return result


def matmul_rows(rows: np.ndarray, w: PackedTernary, out: np.ndarray, path: str = KERNEL_PATH) -> None:
    """``matmul`` on the CPU for operands already checked: the layers' path, without the checks.

    ``rows``: float32 C-contiguous ``(n, k)``; ``out``: float32 C-contiguous ``(n, m)``, written;
    ``w``: a PackedTernary (its triple is cached by ``_kernel_weights`` on first use); ``path``
    a runnable path. A layer checks its input once per call and its weights once at
    construction, so it skips ``matmul``'s own checks (~4 us a call, 120 calls a 2B4T decode step).
    """
    data, scale, scale_step, k_padded = _kernel_weights(w, path)
    n = rows.shape[0]
    if n:
        q, act_scale, q_sum, scratch = _workspace(n, k_padded, path)
        kernels.ENTRY_POINTS[path](rows, data, q, act_scale, q_sum, scale, scale_step, kernels.NO_ACC, out, True,
                                   *scratch)

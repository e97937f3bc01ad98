"""The Metal backend: bitnet's MSL shaders dispatched through ``metalcompute`` on Apple GPUs.

``bn.matmul(x, w, device="metal")`` lands in :func:`matmul` here (through
``bitnet.backends``). A decode step or a prefill is three things on the GPU:

1. ``quantize_activations`` (quantize.metal): per-token int8 quantization, one SIMD group
   per token, into zero-padded rows of ``blocks * 256`` bytes;
2. ``ternary_gemv`` (up to ``GEMV_MAX_TOKENS`` tokens) or ``ternary_gemm`` (more tokens, with
   threadgroup tiles) from ternary_matmul.metal: int32 accumulation, ``acc / a * s`` at the end;
3. copying the output out of its buffer through a numpy view (unified memory: no transfer).

Each dispatch is waited for before the next one is made, so no ordering between command
buffers is relied on.

Weights are uploaded once per :class:`~bitnet.PackedTernary` (kept in ``w.cache``) in the
``i2`` layout, which the shaders read as it is. Activations, outputs and the small
parameter buffers come from an :class:`~bitnet.Arena` over :class:`MetalBlocks`, so a
steady-state loop allocates no Metal memory. Each library is compiled once per backend, and
the process uses one backend (:func:`default_backend`).

Nothing here imports ``metalcompute`` until a Metal operation actually runs, so asking
whether Metal is usable (:func:`unavailable_reason`) is safe everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import platform
import threading
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .. import backends, errors
from ..formats import PackedTernary, kernel_layout
from ..memory import Arena
from . import shaders
from .blocks import MetalBlocks

"""The packing format the shaders read (see ternary_matmul.metal)."""

BLOCK_COLUMNS = 256
"""Columns per i2 block; activation rows are padded to a multiple of it on the GPU."""

GEMV_MAX_TOKENS = 4
"""Up to this many tokens use the GEMV kernel (decode); more use the tiled GEMM (prefill)."""

FLAG_SCALED = shaders.constant("ternary_matmul", "FLAG_SCALED")
FLAG_SCALE_PER_ROW = shaders.constant("ternary_matmul", "FLAG_SCALE_PER_ROW")
GEMV_ROWS = shaders.constant("ternary_matmul", "GEMV_ROWS")
TILE_ROWS = shaders.constant("ternary_matmul", "TILE_ROWS")
TILE_TOKENS = shaders.constant("ternary_matmul", "TILE_TOKENS")
GEMM_GROUP_THREADS = shaders.constant("ternary_matmul", "GEMM_GROUP_THREADS")

_CACHE_KEY = "metal"
_backend_ids = itertools.count()


def unavailable_reason() -> str | None:
    """Why Metal cannot run here (not macOS, not arm64, metalcompute missing), or None when it can.

    Never imports metalcompute: on macOS arm64 it only checks that the package is installed.
    """
    system = platform.system()
    if system != "Darwin":
        return f"not macOS (this is {system or 'an unknown system'})"
    machine = platform.machine()
    if machine != "arm64":
        return f"not arm64 (this Mac is {machine}; metalcompute needs Apple silicon)"
    if importlib.util.find_spec("metalcompute") is None:
        return "metalcompute is not installed"
    return None


@dataclass(frozen=True)
class MetalWeights:
    """A :class:`~bitnet.PackedTernary` uploaded to one Metal device.

    Attributes
    ----------
    shape : ``(m, k)``, out and in features.
    blocks : number of 256-column blocks per row (``ceil(k / 256)``).
    words : the ``i2`` payload, ``m * blocks * 64`` bytes, read by the shaders as uint32 words.
    scale : the float32 scale: one value, or one per output row when ``per_row_scale``.
    """

    shape: tuple[int, int]
    blocks: int
    words: object
    scale: object
    per_row_scale: bool


class MetalBackend:
    """The Metal operations on one device, with their compiled kernels and buffer pool.

    Parameters
    ----------
    mc_module : module, optional
        The ``metalcompute`` module to use; imported on first need when omitted. Tests pass
        a stand-in (the CPU emulation, or a recorder around it).
    arena : Arena, optional
        The pool for activation, output and parameter buffers; a new one over
        :class:`MetalBlocks` of this device when omitted.

    Raises
    ------
    DeviceError
        metalcompute cannot be imported, or has no device.
    """

    def __init__(self, mc_module: ModuleType | None = None, arena: Arena | None = None) -> None:
        self.mc = _import_metalcompute() if mc_module is None else mc_module
        try:
            self.device = self.mc.Device()
        except Exception as e:  # metalcompute raises plain exceptions when there is no GPU
            raise errors.DeviceError(f"device 'metal' is not available: metalcompute found no device ({e})") from e
        self.arena = Arena(backend=MetalBlocks(self.device)) if arena is None else arena
        self._key = next(_backend_ids)
        self._libraries: dict[str, object] = {}
        self._functions: dict[str, object] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ public operations

    def quantize_activations(self, x) -> tuple[np.ndarray, np.ndarray]:
        """:func:`bitnet.quantize_activations` on the GPU; bit-identical ``(q int8, a float32)``."""
        x = np.asarray(x)
        errors.check_float(x, "activations")
        errors.check_ndim(x, "activations", (1, 2))
        if x.shape[-1] == 0:
            raise errors.ShapeError(f"activations must have at least one feature, got shape {x.shape}")
        rows = errors.token_rows(x, "activations", x.shape[-1])
        n, k = rows.shape
        with self._lock, self.arena.frame():
            q, a = self._quantize(self._staged(rows), ceil_div(k, BLOCK_COLUMNS))
            q_host, a_host = q[:, :k].copy(), a.copy()
        return q_host.reshape(x.shape), a_host.reshape((1,) if x.ndim == 1 else (n, 1))

    def matmul_int(self, q, w: PackedTernary) -> np.ndarray:
        """:func:`bitnet.matmul_int` on the GPU: exact int32 ``q @ codes.T``."""
        q = np.asarray(q)
        errors.check_dtype(q, "activations", [np.int8])
        weights = self.upload(w)
        rows = errors.token_rows(q, "activations", weights.shape[1])
        with self._lock, self.arena.frame():
            q_dev = self.arena.zeros((rows.shape[0], weights.blocks * BLOCK_COLUMNS), np.int8)
            q_dev[:, : rows.shape[1]] = rows
            acc = self._matmul(weights, q_dev, None, np.int32)
            result = acc.copy()
        return result.reshape(q.shape[:-1] + (weights.shape[0],))

    def matmul(self, x, w: PackedTernary, out: np.ndarray | None = None) -> np.ndarray:
        """:func:`bitnet.matmul` on the GPU: ``acc / a * s`` in float32.

        The integer accumulators are exact; the final scaling is done in float32 on the GPU
        (the CPU path may round differently in the last bit).
        """
        x = np.asarray(x)
        errors.check_float(x, "activations")
        weights = self.upload(w)
        rows = errors.token_rows(x, "activations", weights.shape[1])
        result_shape = x.shape[:-1] + (weights.shape[0],)
        if out is not None:
            _check_out(out, result_shape)
        with self._lock, self.arena.frame():
            q, a = self._quantize(self._staged(rows), weights.blocks)
            y = self._matmul(weights, q, a, np.float32).reshape(result_shape)
            if out is None:
                out = y.copy()
            else:
                out[...] = y
        return out

    def upload(self, w: PackedTernary) -> MetalWeights:
        """The device copy of ``w``, uploaded on first use and kept in ``w.cache``.

        Raises
        ------
        FormatError
            ``w`` has group scales (the shaders take one scale per tensor or per row).
        """
        if not isinstance(w, PackedTernary):
            raise errors.DTypeError(f"weights must be a bn.PackedTernary (see bn.pack), got {type(w).__name__}")
        uploads = w.cache.setdefault(_CACHE_KEY, {})
        if self._key not in uploads:
            packed = kernel_layout(w)
            with self._lock:
                uploads[self._key] = MetalWeights(
                    shape=w.shape,
                    blocks=ceil_div(w.shape[1], BLOCK_COLUMNS),
                    words=self._device_copy(packed.data),
                    scale=self._device_copy(w.scale.reshape(-1)),
                    per_row_scale=w.granularity == "channel",
                )
        return uploads[self._key]

    # ------------------------------------------------------------------ dispatch

    def function(self, name: str) -> object:
        """The compiled kernel ``name``; its library is compiled on first use, once."""
        with self._lock:
            if name not in self._functions:
                library = shaders.LIBRARY_OF_KERNEL[name]
                if library not in self._libraries:
                    self._libraries[library] = self.device.kernel(shaders.source(library))
                self._functions[name] = self._libraries[library].function(name)
            return self._functions[name]

    def _quantize(self, x: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray]:
        n, k = x.shape
        q = self.arena.empty((n, blocks * BLOCK_COLUMNS), np.int8)
        a = self.arena.empty(n, np.float32)
        bind = self.arena.block_of
        params = self._params(n, k, q.shape[1])
        self._run("quantize_activations", n * shaders.SIMD_WIDTH, bind(x), bind(q), bind(a), bind(params))
        return q, a

    def _matmul(self, w: MetalWeights, q: np.ndarray, a: np.ndarray | None, dtype) -> np.ndarray:
        """Run GEMV or GEMM on padded int8 rows ``q``; float32 ``acc / a * s`` if ``a`` is given, else int32."""
        n, m = q.shape[0], w.shape[0]
        out = self.arena.empty((n, m), dtype)
        flags = (FLAG_SCALED if a is not None else 0) | (FLAG_SCALE_PER_ROW if w.per_row_scale else 0)
        act_scale = a if a is not None else self.arena.empty(1, np.float32)  # bound, never read
        if n <= GEMV_MAX_TOKENS:
            name, count = "ternary_gemv", n * ceil_div(m, GEMV_ROWS) * shaders.SIMD_WIDTH
        else:
            name, count = "ternary_gemm", ceil_div(m, TILE_ROWS) * ceil_div(n, TILE_TOKENS) * GEMM_GROUP_THREADS
        bind = self.arena.block_of
        params = self._params(n, m, w.blocks, flags)
        self._run(name, count, w.words, bind(q), bind(act_scale), w.scale, bind(out), bind(params))
        return out

    def _run(self, name: str, count: int, *buffers) -> None:
        """Dispatch ``count`` threads of kernel ``name`` over ``buffers`` (``[[buffer(0)]]``, ...) and wait."""
        if count == 0:
            return  # nothing to compute; Metal rejects empty grids
        handle = self.function(name)(count, *buffers)
        del handle  # metalcompute waits for the kernel when its handle goes

    def _params(self, *values: int) -> np.ndarray:
        """A small uint32 buffer of kernel parameters (metalcompute passes no scalars)."""
        params = self.arena.empty(len(values), np.uint32)
        params[:] = values
        return params

    def _staged(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` copied into a pooled device buffer, as float32."""
        x = self.arena.empty(rows.shape, np.float32)
        x[...] = rows
        return x

    def _device_copy(self, array: np.ndarray) -> object:
        data = np.ascontiguousarray(array)
        # Metal cannot make an empty buffer; a tensor with no rows still binds 4 bytes.
        return self.device.buffer(data if data.nbytes else np.zeros(1, np.float32))


# ---------------------------------------------------------------------- module level API


_default: MetalBackend | None = None
_default_lock = threading.Lock()


def default_backend() -> MetalBackend:
    """The process-wide backend on metalcompute's default device (made on first use).

    Raises
    ------
    DeviceError
        Metal is not usable here; the message says why and how to install it.
    """
    global _default
    if _default is None:
        backends.get_backend("metal")  # raises DeviceError with the reason and the install hint
        with _default_lock:
            if _default is None:
                _default = MetalBackend()
    return _default


def quantize_activations(x) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bitnet.quantize_activations` on the default Metal device."""
    return default_backend().quantize_activations(x)


def matmul_int(q, w: PackedTernary) -> np.ndarray:
    """:func:`bitnet.matmul_int` on the default Metal device."""
    return default_backend().matmul_int(q, w)


def matmul(x, w: PackedTernary, out: np.ndarray | None = None) -> np.ndarray:
    """:func:`bitnet.matmul` on the default Metal device (``bn.matmul(x, w, device="metal")``)."""
    return default_backend().matmul(x, w, out=out)


def upload(w: PackedTernary) -> MetalWeights:
    """Upload ``w`` to the default Metal device now (what ``layer.to("metal")`` does with its weights)."""
    return default_backend().upload(w)


# ---------------------------------------------------------------------- helpers


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _import_metalcompute() -> ModuleType:
    try:
        return importlib.import_module("metalcompute")
    except ImportError as e:
        raise errors.DeviceError(
            f"device 'metal' is not available: metalcompute cannot be imported ({e}). "
            f"Install: {backends.INSTALL_HINTS['metal']}"
        ) from e




def _check_out(out: np.ndarray, shape: tuple[int, ...]) -> None:
    if not isinstance(out, np.ndarray):
        raise errors.DTypeError(f"out must be a numpy array, got {type(out).__name__}")
    errors.check_dtype(out, "out", [np.float32])
    if out.shape != shape:
        raise errors.ShapeError(f"out must have shape {shape}, got {out.shape}")
    if not out.flags.writeable:
        raise errors.ShapeError("out must be a writeable array")


__all__ = [
    "MetalBackend",
    "MetalBlocks",
    "MetalWeights",
    "default_backend",
    "matmul",
    "matmul_int",
    "quantize_activations",
    "unavailable_reason",
    "upload",
]

"""The "cuda" device of ``bitnet.backends``: ternary matmul on NVIDIA GPUs through numba-cuda.

The functions here have the signatures and the bit-exact results of ``bitnet.ops`` and
``bitnet.quant`` (``matmul``, ``matmul_int``, ``quantize_activations``). ``linear`` is the
device-resident form for layers: device arrays in, device arrays out, weights uploaded once.

Under ``NUMBA_ENABLE_CUDASIM=1`` (set before numba is imported) the same kernels run in
numba's CUDA simulator, which counts as available: that is how CI tests them without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np

from .. import backends, errors
from ..formats import PackedTernary
from .weights import DeviceTernary, upload

# A block keeps the token's int8 codes (kpad bytes) in shared memory in the fused decode
# kernel; past the default 48 KiB per block the two-launch path takes over.
FUSED_MAX_SHARED_BYTES = 48 * 1024
# Quantized-activation buffers kept for reuse, keyed by (tokens, kpad, stream).
MAX_WORKSPACES = 16
_WORKSPACES: dict = {}
# dp4a needs compute capability 6.1 (Pascal) or newer.
MIN_COMPUTE_CAPABILITY = (6, 1)

__all__ = ["DeviceTernary", "linear", "matmul", "matmul_int", "quantize_activations", "unavailable_reason", "upload"]


@functools.cache
def unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run here, or None when it can (the simulator counts).

    Cheap after the first call (the answer is cached) and never raises.
    """
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed"
    try:
        from numba import config, cuda
    except Exception as e:  # a broken install (e.g. a numpy it does not support) must not crash callers
        return f"numba-cuda failed to import: {type(e).__name__}: {e}"
    if config.ENABLE_CUDASIM:
        return None
    try:
        cuda.current_context()
        capability = cuda.get_current_device().compute_capability
    except Exception as e:
        return f"no CUDA driver / GPU found: {' '.join(str(e).split()).rstrip(' :')}"  # numba's is multi-line
    if capability < MIN_COMPUTE_CAPABILITY:
        return f"the GPU has compute capability {capability}; dp4a needs {MIN_COMPUTE_CAPABILITY} or newer"
    return None


def _require_cuda():
    """The kernels module, or DeviceError with the reason and an install hint."""
    reason = unavailable_reason()
    if reason is not None:
        raise errors.DeviceError(f"device 'cuda' is not available: {reason}. Install: {backends.INSTALL_HINTS['cuda']}")
    from . import kernels

    return kernels


def _device_array(x):
    """``x`` as a numba device array if it lives on the GPU, else None.

    Numba device arrays pass through as they are (no wrapper to build on the decode path);
    anything else with ``__cuda_array_interface__`` (torch CUDA tensors, CuPy arrays) is
    wrapped. The simulator has no such interface: there its own device arrays are the GPU's.
    """
    from numba import config, cuda

    if config.ENABLE_CUDASIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return x if isinstance(x, FakeCUDAArray) else None
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    if isinstance(x, DeviceNDArray):
        return x
    return cuda.as_cuda_array(x) if cuda.is_cuda_array(x) else None


def _resident(w: PackedTernary | DeviceTernary) -> DeviceTernary:
    return w if isinstance(w, DeviceTernary) else upload(w)


def _as_token_rows(x) -> np.ndarray:
    """Host activations as C-contiguous float32 ``(n, k)``, validated like ``bn.quantize_activations``."""
    x = np.asarray(x)
    errors.check_float(x, "activations")
    errors.check_ndim(x, "activations", (1, 2))
    if x.shape[-1] == 0:
        raise errors.ShapeError(f"activations must have at least one feature, got shape {x.shape}")
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)


def _check_features(k: int, w) -> None:
    if k != w.shape[1]:
        raise errors.ShapeError(f"activations have {k} features, the weights take {w.shape[1]}")


@functools.cache
def _multiprocessors() -> int:
    """Multiprocessors of the current GPU; 1 under the simulator (tests then run several rows per warp)."""
    from numba import config, cuda

    return 1 if config.ENABLE_CUDASIM else cuda.get_current_device().MULTIPROCESSOR_COUNT


def _rows_per_warp(kernels, m: int) -> int:
    """Rows per warp for a GEMV grid that fills the GPU's resident block slots once.

    Each block quantizes the token before its rows, so fewer, longer-lived blocks pay that
    cost fewer times; one wave of blocks also leaves no tail wave half empty.
    """
    blocks = _multiprocessors() * kernels.GEMV_BLOCKS_PER_SM
    return max(1, -(-m // (blocks * kernels.WARPS)))


def _workspace(n: int, kpad: int, stream):
    """Device buffers for ``n`` quantized tokens, reused by every call with the same shape and stream.

    Reuse is safe because launches on one stream run in order; allocating per call would
    put a cudaMalloc on every prefill matmul.
    """
    from numba import cuda

    key = (n, kpad, stream)
    if key not in _WORKSPACES:
        if len(_WORKSPACES) >= MAX_WORKSPACES:
            _WORKSPACES.clear()
        _WORKSPACES[key] = (
            cuda.device_array((n, kpad // 4), np.int32, stream=stream),
            cuda.device_array(n, np.int32, stream=stream),
            cuda.device_array(n, np.float32, stream=stream),
        )
    return _WORKSPACES[key]


def _quantize_on_device(kernels, x_dev, kpad: int, stream=0):
    """Launch ``quantize_rows``: packed int8 codes ``(n, kpad // 4)``, code sums and scales, on the GPU."""
    n, k = x_dev.shape
    qwords, qsums, scales = _workspace(n, kpad, stream)
    kernels.quantize_rows[n, kernels.THREADS, stream](x_dev, k, qwords, qsums, scales)
    return qwords, qsums, scales


def _linear_2d(kernels, x_dev, w: DeviceTernary, out_dev, stream=0) -> None:
    """``out_dev[n, m] = matmul(x_dev[n, k], w)`` on the GPU; picks the decode or the prefill kernel."""
    n, k = x_dev.shape
    m = w.shape[0]
    if n == 1 and w.kpad <= FUSED_MAX_SHARED_BYTES:
        rows = _rows_per_warp(kernels, m)
        grid = (kernels.grid_rows(m, rows), n)
        kernels.quantize_gemv[grid, kernels.THREADS, stream, w.kpad](
            x_dev, k, w.words, w.scale, rows, out_dev
        )
        return
    qwords, qsums, scales = _quantize_on_device(kernels, x_dev, w.kpad, stream)
    grid = (kernels.grid_rows(m, kernels.GEMM_ROWS), -(-n // kernels.TOKEN_TILE))
    kernels.gemm[grid, kernels.THREADS, stream](qwords, qsums, scales, w.words, w.scale, out_dev)


def linear(x, w: PackedTernary | DeviceTernary, out=None, stream=0):
    """``matmul(x, w)`` with everything on the GPU: the form layers and models use.

    Parameters
    ----------
    x : device float32 array (numba device array, or anything with
        ``__cuda_array_interface__`` such as a torch CUDA tensor), shape ``(k,)`` or ``(n, k)``.
    w : PackedTernary (uploaded on first use and cached in ``w.cache``) or DeviceTernary.
    out : optional device float32 array of the result's shape, written in place; passing
        one keeps allocations off the decode critical path.
    stream : numba CUDA stream to launch on (default: the legacy default stream): the one
        ``StepGraph`` hands its step, or ``cuda.external_stream(...)`` to join another
        library's stream.

    Returns
    -------
    Device float32 array ``(m,)`` or ``(n, m)``, bit-identical to ``bn.matmul`` on the CPU.
    One kernel launch for a single token (quantization fused in), two otherwise.
    """
    kernels = _require_cuda()
    from numba import cuda

    x_dev = _device_array(x)
    if x_dev is None:
        raise errors.DeviceError("linear takes device arrays; use matmul for host arrays, or cuda.to_device(x)")
    errors.check_dtype(x_dev, "device activations", [np.float32])
    errors.check_ndim(x_dev, "device activations", (1, 2))
    w = _resident(w)
    x_shape = tuple(x_dev.shape)  # a plain tuple: the simulator's shapes refuse negative indices
    _check_features(x_shape[-1], w)
    x2 = x_dev.reshape(1, x_shape[0]) if x_dev.ndim == 1 else x_dev
    shape = (w.shape[0],) if x_dev.ndim == 1 else (x_shape[0], w.shape[0])
    if out is None:
        out = cuda.device_array(shape, np.float32, stream=stream)
    out_dev = _device_array(out)
    if out_dev is None:
        raise errors.DeviceError("out must be a device array when x is one")
    errors.check_dtype(out_dev, "out", [np.float32])
    if tuple(out_dev.shape) != shape:
        raise errors.ShapeError(f"out must have shape {shape}, got {tuple(out_dev.shape)}")
    out2 = out_dev.reshape(1, shape[0]) if x_dev.ndim == 1 else out_dev
    _linear_2d(kernels, x2, w, out2, stream)
    return out


def matmul(x, w: PackedTernary | DeviceTernary, out: np.ndarray | None = None):
    """``x @ W.T`` on the GPU with the exact result of ``bn.matmul`` (float32 ``acc / a * s``).

    Host arrays in give a host array out (``out`` written in place if given); device arrays
    in give a device array out (see :func:`linear`). Weights stay on the GPU between calls.
    """
    kernels = _require_cuda()
    from numba import cuda

    if _device_array(x) is not None:
        return linear(x, w, out)
    w = _resident(w)
    rows = _as_token_rows(x)
    _check_features(rows.shape[1], w)
    shape = (w.shape[0],) if np.ndim(x) == 1 else (rows.shape[0], w.shape[0])
    if out is not None:
        errors.check_dtype(out, "out", [np.float32])
        if out.shape != shape:
            raise errors.ShapeError(f"out must have shape {shape}, got {out.shape}")
    out_dev = cuda.device_array((rows.shape[0], w.shape[0]), np.float32)
    _linear_2d(kernels, cuda.to_device(rows), w, out_dev)
    result = out_dev.copy_to_host().reshape(shape)
    if out is None:
        return result
    out[...] = result
    return out


def quantize_activations(x) -> tuple[np.ndarray, np.ndarray]:
    """``bn.quantize_activations`` computed on the GPU: ``(q int8, a float32)``, bit-identical."""
    kernels = _require_cuda()
    from numba import cuda

    rows = _as_token_rows(x)
    n, k = rows.shape
    qwords, _, scales = _quantize_on_device(kernels, cuda.to_device(rows), -(-k // 256) * 256)
    q = qwords.copy_to_host().view(np.int8)[:, :k]
    a = scales.copy_to_host()
    return np.ascontiguousarray(q).reshape(np.shape(x)), a.reshape((1,) if np.ndim(x) == 1 else (n, 1))


def matmul_int(q, w: PackedTernary | DeviceTernary) -> np.ndarray:
    """``bn.matmul_int`` on the GPU: exact int32 ``q @ codes.T`` of int8 activations ``(k,)`` or ``(n, k)``."""
    kernels = _require_cuda()
    from numba import cuda

    q = np.asarray(q)
    errors.check_dtype(q, "activations", [np.int8])
    errors.check_ndim(q, "activations", (1, 2))
    w = _resident(w)
    _check_features(q.shape[-1], w)
    rows = q.reshape(-1, q.shape[-1])
    n, k = rows.shape
    padded = np.zeros((n, w.kpad), np.int8)
    padded[:, :k] = rows
    qsums = rows.sum(axis=1, dtype=np.int64).astype(np.int32)
    out_dev = cuda.device_array((n, w.shape[0]), np.int32)
    grid = (kernels.grid_rows(w.shape[0], kernels.GEMM_ROWS), -(-n // kernels.TOKEN_TILE))
    qwords = cuda.to_device(padded.view(np.int32))
    kernels.gemm_int[grid, kernels.THREADS](qwords, cuda.to_device(qsums), w.words, out_dev)
    result = out_dev.copy_to_host()
    return result.reshape(w.shape[0]) if q.ndim == 1 else result

"""Warp shuffles for numba's CUDA simulator, which has none.

Under ``NUMBA_ENABLE_CUDASIM=1`` numba runs every CUDA thread of a block as a Python
thread, but ``cuda.shfl_down_sync`` is missing, so the kernels of ``bitnet.cuda.kernels``
could not run there unchanged. ``install()`` adds it and ``shfl_xor_sync`` to the
simulator's fake ``cuda`` module: the 32 lanes of a warp meet at a barrier, publish their
values, meet again and each reads its source lane (``lane + delta``, its own value past the
end of the warp, as on the GPU; or ``lane ^ mask``).

Like a real full-mask shuffle, every lane of the warp must make the call, and the block
size must be a multiple of 32.
"""

from __future__ import annotations

import threading

WARP = 32
# A lane waiting longer than this means another thread of the block died; fail, don't hang.
BARRIER_TIMEOUT_S = 120.0

_state_lock = threading.Lock()


def _warp_state(thread) -> tuple[threading.Barrier, list]:
    """The barrier and the value slots of ``thread``'s warp, made on first use per block."""
    warp = thread.thread_id // WARP
    with _state_lock:
        warps = thread._manager.__dict__.setdefault("_bitnet_warps", {})
        if warp not in warps:
            warps[warp] = (threading.Barrier(WARP, timeout=BARRIER_TIMEOUT_S), [None] * WARP)
        return warps[warp]


def _shuffle(mask, value, source):
    """Every lane publishes ``value``, then reads lane ``source(lane)`` (its own if that is None)."""
    if mask != 0xFFFFFFFF:
        raise NotImplementedError("the simulator's warp shuffles support only the full warp mask")
    thread = threading.current_thread()
    barrier, values = _warp_state(thread)
    lane = thread.thread_id % WARP
    values[lane] = value
    barrier.wait()
    other = source(lane)
    result = value if other is None else values[other]
    barrier.wait()  # nobody overwrites a slot before every lane has read it
    return result


def _shfl_down_sync(self, mask, value, delta):
    return _shuffle(mask, value, lambda lane: lane + delta if lane + delta < WARP else None)


def _shfl_xor_sync(self, mask, value, lane_mask):
    return _shuffle(mask, value, lambda lane: lane ^ lane_mask)


def install() -> None:
    """Give the simulator's fake ``cuda`` module a ``shfl_down_sync`` (idempotent)."""
    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    if not hasattr(FakeCUDAModule, "shfl_down_sync"):
        FakeCUDAModule.shfl_down_sync = _shfl_down_sync
        FakeCUDAModule.shfl_xor_sync = _shfl_xor_sync

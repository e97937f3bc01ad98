"""Shared test helpers: random inputs with awkward sizes, and every kernel path (skipped where it cannot run)."""

import numba
import numpy as np
import pytest

from bitnet.kernels import cpu_features

ALL_PATHS = [
    pytest.param(path, marks=pytest.mark.skipif(reason is not None, reason=str(reason)), id=path)
    for path, reason in ((p, cpu_features.unsupported_reason(p)) for p in cpu_features.PATHS)
]
"""Every kernel path, for ``@pytest.mark.parametrize("path", ALL_PATHS)``: a path this machine
cannot run shows as a skip with the reason (``amx: CPU lacks amx-tile, amx-int8 ...``)."""

AVX512_ASM = pytest.mark.skipif(
    not {"avx512f", "f16c"} <= cpu_features._compile_target_features(),
    reason="the check is for AVX-512 code: Numba does not compile for an AVX-512 CPU with F16C here")
"""Marks a test that reads the AVX-512 assembly Numba makes on this machine."""


def fresh_asm(dispatcher, *args) -> str:
    """The assembly of ``dispatcher`` compiled anew for ``args`` (Numba shows none for cached code)."""
    options = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("nopython", "cache")}
    fresh = numba.njit(**options)(dispatcher.py_func)
    fresh(*args)
    return "\n".join(fresh.inspect_asm().values())


@pytest.fixture
def rng():
    return np.random.default_rng(20261126)


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one Numba thread: on a busy machine a thread pool waiting for cores is far slower."""
    import torch

    import bitnet as bn

    threads, numba_threads = torch.get_num_threads(), bn.get_num_threads()
    torch.set_num_threads(1)
    bn.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    bn.set_num_threads(numba_threads)

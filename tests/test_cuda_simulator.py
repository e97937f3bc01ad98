"""The CUDA backend without a GPU: the error it gives, and its kernels under numba's simulator.

``NUMBA_ENABLE_CUDASIM`` is read when numba is first imported, and the rest of this pytest
process has already imported numba for the CPU kernels, so the simulator run happens in a
child pytest process over ``test_cuda.py``.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bitnet as bn
from bitnet.cuda import backend as cuda_backend

TESTS = Path(__file__).resolve().parent
HAS_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None


def _simulating() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


@pytest.fixture
def fresh_reason():
    """Let a test change what ``unavailable_reason`` sees, then forget its cached answer."""
    cuda_backend.unavailable_reason.cache_clear()
    yield
    cuda_backend.unavailable_reason.cache_clear()


@pytest.mark.skipif(not HAS_NUMBA_CUDA, reason="numba-cuda is not installed")
def test_kernels_under_the_simulator():
    if _simulating():
        pytest.skip("this process is the simulator: test_cuda.py runs here directly")
    if cuda_backend.unavailable_reason() is None:
        pytest.skip("a GPU is here: test_cuda.py runs on it directly")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", str(TESTS / "test_cuda.py")],
        env=env,
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]


@pytest.mark.skipif(not HAS_NUMBA_CUDA, reason="numba-cuda is not installed")
def test_no_gpu_gives_device_error_with_reason():
    reason = cuda_backend.unavailable_reason()
    if reason is None:
        pytest.skip("CUDA (or the simulator) is usable here")
    assert "driver" in reason or "GPU" in reason
    assert "cuda" not in bn.devices()
    p = bn.pack(bn.quantize_weights(np.ones((2, 4), np.float32)), "i2")
    with pytest.raises(bn.DeviceError, match="not available") as caught:
        bn.matmul(np.ones(4, np.float32), p, device="cuda")
    assert reason in str(caught.value) and "numba-cuda" in str(caught.value)


def test_missing_numba_cuda_is_named(monkeypatch, fresh_reason):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "numba_cuda" else real_find_spec(name, *a)
    )
    assert cuda_backend.unavailable_reason() == "numba-cuda is not installed"
    with pytest.raises(bn.DeviceError, match="numba-cuda is not installed.*Install"):
        cuda_backend.quantize_activations(np.ones((1, 4), np.float32))

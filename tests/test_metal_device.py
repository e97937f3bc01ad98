"""The Metal backend on a real Apple GPU through the real metalcompute.

These run only where metalcompute imports (macOS on Apple silicon, ``pip install
"bitnet-numba[metal]"``) and are skipped elsewhere with the reason. As of this writing they have
never been run: the project's machines are Linux (see docs/backends.md, "Metal backend").
"""

from __future__ import annotations

import numpy as np
import pytest

import bitnet as bn
from bitnet.metal import bridge

REASON = bridge.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"needs metalcompute on an Apple GPU: {REASON}")


@pytest.fixture(scope="module")
def backend():
    return bridge.default_backend()


def test_metal_is_listed():
    assert "metal" in bn.devices()


@pytest.mark.parametrize("n, k", [(1, 1), (1, 2560), (7, 513), (64, 300)])
def test_quantization_is_bit_identical(backend, rng, n, k):
    x = (rng.standard_normal((n, k)) * 10).astype(np.float32)
    if n > 1:
        x[0, 0] = np.nan   # a NaN row: a = NaN, q = 0
    q, a = backend.quantize_activations(x)
    q_ref, a_ref = bn.quantize_activations(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(a.view(np.uint32), a_ref.view(np.uint32))


@pytest.mark.parametrize("n, m, k", [(1, 1, 1), (1, 2560, 2560), (3, 45, 300), (40, 70, 513), (128, 6912, 2560)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_matmul_on_the_gpu(backend, rng, n, m, k, granularity):
    p = bn.pack(bn.quantize_weights(rng.standard_normal((m, k)).astype(np.float32), granularity=granularity), "i2")
    x = rng.standard_normal((n, k)).astype(np.float32)
    q, _ = bn.quantize_activations(x)
    np.testing.assert_array_equal(backend.matmul_int(q, p), bn.matmul_int(q, p))
    # The shader divides with precise::divide, as the CPU does (the emulation finds them bit-identical);
    # the tolerance stays until a real GPU has shown the same.
    np.testing.assert_allclose(bn.matmul(x, p, device="metal"), bn.matmul(x, p), rtol=1e-6, atol=1e-30)

"""CUDA backend: BitNet ternary kernels on NVIDIA GPUs, written with numba-cuda.

``bn.matmul(x, w, device="cuda")`` dispatches here through ``bitnet.backends``. For layers
and models, ``upload(w)`` puts a PackedTernary's weights on the GPU once and
``linear(x_dev, w)`` runs the matmul on device arrays, so a decode step never copies
weights back. Modules: ``backend`` (availability, host and device entry points),
``weights`` (the resident layout), ``kernels`` (numba-cuda kernels), ``simulator``
(warp shuffles for numba's CUDA simulator, used by CI).

Importing this package does not import ``numba.cuda``; ``unavailable_reason()`` says why
CUDA cannot be used here, if it cannot.
"""

from .backend import DeviceTernary, linear, matmul, matmul_int, quantize_activations, unavailable_reason, upload

__all__ = ["DeviceTernary", "linear", "matmul", "matmul_int", "quantize_activations", "unavailable_reason", "upload"]

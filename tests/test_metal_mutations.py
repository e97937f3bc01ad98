"""Bugs planted in copies of the Metal shaders, one at a time: the emulation's checks must catch each.

Each mutation replaces one piece of a shader's text (in a copy of the source held in memory;
the package's .metal files are not touched) and runs :func:`check_shaders`, a small version
of what ``test_metal_shaders.py`` checks: build both libraries, make every kernel's pipeline,
and compare one dispatch of each kernel with the CPU, at a narrow threadgroup width forward
and reversed. The unmutated shaders pass it; every mutation must fail it the way its class of
bug is caught: a compile error (address spaces), a bounds error (a read past a buffer), a
pipeline error (threadgroup memory past 32 KiB), the fastMath rule (a float ``/``), or wrong
results (logic). Mutants that compile are cached like any source (see ``compiler.py``), so
after the first run only the ones that fail to build cost a compile.
"""

from __future__ import annotations

import numpy as np
import pytest

import bitnet as bn
from bitnet.metal import bridge, shaders
from bitnet.metal.emulation import EmulationError, find_compiler, metalcompute_module

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no g++: the MSL emulation compiles shaders as C++")

LIBRARIES = ("quantize", "ternary_matmul")


def check_shaders(sources: dict[str, str]) -> None:
    """Build ``sources`` ({library: MSL text}) and run each kernel once against the CPU; raise on any difference."""
    rng = np.random.default_rng(7)
    n, m, k = 33, 45, 600       # m: not a multiple of 4 rows; k: 3 blocks of 256, the last one padded
    stride = -(-k // 256) * 256
    x = rng.standard_normal((n, k)).astype(np.float32)
    p = bn.pack(bn.quantize_weights(rng.standard_normal((m, k)).astype(np.float32), granularity="channel"), "i2")
    q_ref, a_ref = bn.quantize_activations(x)
    expected = (bn.matmul_int(q_ref, p).astype(np.float32) / a_ref * p.scale.reshape(-1)).view(np.uint32)
    for reverse in (False, True):
        device = metalcompute_module(64, reverse).Device()
        quantize = device.kernel(sources["quantize"]).function("quantize_activations")
        matmul = device.kernel(sources["ternary_matmul"])
        gemv, gemm = matmul.function("ternary_gemv"), matmul.function("ternary_gemm")

        q, a = device.buffer(n * stride), device.buffer(n * 4)
        quantize(n * 32, device.buffer(x), q, a, device.buffer(np.array([n, k, stride], np.uint32)))
        np.testing.assert_array_equal(np.frombuffer(q, np.int8).reshape(n, stride)[:, :k], q_ref)
        np.testing.assert_array_equal(np.frombuffer(a, np.float32), a_ref.reshape(-1))

        flags = np.array([n, m, stride // 256, bridge.FLAG_SCALED | bridge.FLAG_SCALE_PER_ROW], np.uint32)
        counts = {
            gemv: n * -(-m // bridge.GEMV_ROWS) * 32,
            gemm: -(-m // bridge.TILE_ROWS) * -(-n // bridge.TILE_TOKENS) * bridge.GEMM_GROUP_THREADS,
        }
        for function, count in counts.items():
            out = device.buffer(n * m * 4)
            function(count, device.buffer(p.data), q, a, device.buffer(p.scale.reshape(-1)), out,
                     device.buffer(flags))
            np.testing.assert_array_equal(np.frombuffer(out, np.uint32).reshape(n, m), expected,
                                          err_msg=function.name)


# (library, text in the shader, what it becomes, the error the checks must raise)
MUTATIONS = {
    # Address spaces: Apple's compiler rejects each; the emulation's pointer types do too.
    "kernel parameter without device": (
        "quantize", "device const float* x [[buffer(0)]]", "const float* x [[buffer(0)]]",
        (EmulationError, r"could not compile(.|\n)*buffer_binding"),
    ),
    "helper parameter without device": (
        "ternary_matmul", "device const float* act_scale, device const float* weight_scale)",
        "const float* act_scale, device const float* weight_scale)",
        (EmulationError, r"could not compile(.|\n)*cannot convert"),
    ),
    "constant buffer passed as device": (
        "ternary_matmul", "read_shape(constant uint* params)", "read_shape(device uint* params)",
        (EmulationError, r"could not compile(.|\n)*from .pointer<msl_emu::space::constant_memory"),
    ),
    # A read past the end of a buffer: the last row's padding reads x beyond its k values.
    "quantize reads past the row": (
        "quantize", "if (finite && j < k) {", "if (finite) {",
        (EmulationError, r"kernel quantize_activations: thread \d+ accessed element \d+ of buffer 0"),
    ),
    "gemv reads weight rows past m": (
        "ternary_matmul", "            if (r < shape.m) {\n                const uint word",
        "            {\n                const uint word",
        (EmulationError, r"kernel ternary_gemv: thread \d+ accessed element \d+ of buffer 0"),
    ),
    # fastMath: Apple's default makes a float `/` approximate.
    "plain division in quantize": (
        "quantize", "precise::divide(127.0f, max(as_type<float>(absmax_bits), 1e-5f))",
        "127.0f / max(as_type<float>(absmax_bits), 1e-5f)",
        (EmulationError, r"float division with `/`(.|\n)*line 56: const float a = finite \? 127.0f /"),
    ),
    # Threadgroup memory: 8 KiB of weights + 32 KiB of tokens > Apple's 32 KiB.
    "40 KiB GEMM tile": (
        "ternary_matmul", "TILE_TOKENS = 32;", "TILE_TOKENS = 128;",
        (EmulationError, r"kernel ternary_gemm: its threadgroup variables take 40960 bytes, more than the 32768"),
    ),
    # Logic: wrong results.
    "missing barrier before the tiles are refilled": (
        "ternary_matmul", "threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are refilled", "// ",
        (AssertionError, "ternary_gemm"),
    ),
    "wrong bit pair decoded": (
        "ternary_matmul", "(word >> (2 * pair))", "(word >> pair)",
        (AssertionError, "ternary_gemv"),
    ),
}


def test_the_unmutated_shaders_pass():
    check_shaders({library: shaders.source(library) for library in LIBRARIES})


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_planted_bug_is_caught(mutation):
    library, old, new, (error, message) = MUTATIONS[mutation]
    sources = {name: shaders.source(name) for name in LIBRARIES}
    assert sources[library].count(old) == 1, f"the mutation's text is not once in {library}.metal"
    sources[library] = sources[library].replace(old, new)
    with pytest.raises(error, match=message):
        check_shaders(sources)

"""The Metal bridge: availability and errors, and its metalcompute calls, checked on a recorder.

The recorder is a stand-in ``metalcompute`` module that logs every call the bridge makes
(compiles, functions, buffers, dispatches, waits) and forwards it to the CPU emulation of
the shaders, so the same tests also check that what the bridge binds computes the right thing.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import bitnet as bn
from bitnet.metal import bridge, shaders
from bitnet.metal.blocks import MetalBlocks
from bitnet.metal.emulation import find_compiler, metalcompute_module
from bitnet.metal.emulation.compiler import parse_kernels
from bitnet.metal.emulation.device import Buffer

NO_COMPILER = "no g++: the MSL emulation compiles shaders as C++"
needs_emulation = pytest.mark.skipif(find_compiler() is None, reason=NO_COMPILER)


# ------------------------------------------------------------------ availability


def test_unavailable_here_says_why_without_importing_metalcompute():
    if sys.platform == "darwin":
        pytest.skip("this checks the reasons given off macOS")
    assert bridge.unavailable_reason().startswith("not macOS")
    assert "metal" not in bn.devices()
    assert "metalcompute" not in sys.modules


@pytest.mark.parametrize("system, machine, installed, reason", [
    ("Linux", "x86_64", False, "not macOS (this is Linux)"),
    ("Darwin", "x86_64", True, "not arm64"),
    ("Darwin", "arm64", False, "metalcompute is not installed"),
    ("Darwin", "arm64", True, None),
])
def test_unavailable_reasons(monkeypatch, system, machine, installed, reason):
    monkeypatch.setattr(bridge.platform, "system", lambda: system)
    monkeypatch.setattr(bridge.platform, "machine", lambda: machine)
    monkeypatch.setattr(bridge.importlib.util, "find_spec", lambda name: object() if installed else None)
    got = bridge.unavailable_reason()
    assert got == reason if reason is None else got.startswith(reason)


def test_asking_for_metal_where_it_is_missing_raises_device_error_with_hint(monkeypatch):
    monkeypatch.setattr(bridge, "unavailable_reason", lambda: "not macOS (this is Linux)")
    p = bn.pack(bn.quantize_weights(np.ones((4, 8), np.float32)), "i2")
    for call in (lambda: bn.matmul(np.ones(8, np.float32), p, device="metal"), lambda: bridge.matmul_int(None, p)):
        with pytest.raises(bn.DeviceError, match=r"not macOS \(this is Linux\)\. Install: pip install .*metal"):
            call()


def test_missing_metalcompute_module_is_a_device_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "metalcompute", None)   # import fails
    with pytest.raises(bn.DeviceError, match="metalcompute cannot be imported.*Install"):
        bridge.MetalBackend()


# ------------------------------------------------------------------ the recording metalcompute


class Recorder:
    """A metalcompute module that logs each call and forwards it to ``inner``."""

    def __init__(self, inner):
        self.inner = inner
        self.log: list[tuple] = []
        self.Buffer = inner.Buffer

    def Device(self):  # noqa: N802 - metalcompute's name
        self.log.append(("Device",))
        return _Device(self, self.inner.Device())

    def events(self, kind):
        return [e for e in self.log if e[0] == kind]


class _Device:
    def __init__(self, recorder, inner):
        self.recorder, self.inner = recorder, inner

    def kernel(self, source):
        library = next(name for name in set(shaders.LIBRARY_OF_KERNEL.values()) if shaders.source(name) == source)
        self.recorder.log.append(("kernel", library))
        return _Kernel(self.recorder, self.inner.kernel(source))

    def buffer(self, data):
        self.recorder.log.append(("buffer", "zeroed" if isinstance(data, int) else "copied", np.asarray(data).nbytes
                                  if not isinstance(data, int) else data))
        return self.inner.buffer(data)


class _Kernel:
    def __init__(self, recorder, inner):
        self.recorder, self.inner = recorder, inner

    def function(self, name):
        self.recorder.log.append(("function", name))
        return _Function(self.recorder, name, self.inner.function(name))


class _Function:
    def __init__(self, recorder, name, inner):
        self.recorder, self.name, self.inner = recorder, name, inner

    def __call__(self, count, *arguments):
        self.recorder.log.append(("dispatch", self.name, count, arguments))
        self.inner(count, *arguments)
        return _Handle(self.recorder, self.name)


class _Handle:
    def __init__(self, recorder, name):
        self.recorder, self.name = recorder, name

    def __del__(self):
        self.recorder.log.append(("wait", self.name))


@pytest.fixture
def recorded():
    if find_compiler() is None:
        pytest.skip(NO_COMPILER)
    recorder = Recorder(metalcompute_module(width=256))
    return recorder, bridge.MetalBackend(mc_module=recorder)


def ternary(rng, m, k, granularity="tensor", fmt="i2"):
    return bn.pack(bn.quantize_weights(rng.standard_normal((m, k)).astype(np.float32), granularity=granularity), fmt)


BUFFERS_OF_KERNEL = {
    k.name: k.buffer_count for library in set(shaders.LIBRARY_OF_KERNEL.values())
    for k in parse_kernels(shaders.source(library))
}


def test_bridge_calls_follow_the_metalcompute_api(recorded, rng):
    recorder, backend = recorded
    p = ternary(rng, 45, 300, "channel")
    for n in (1, 3, 37, 1, 37):                          # GEMV and GEMM, twice each
        backend.matmul(rng.standard_normal((n, 300)).astype(np.float32), p)
    backend.matmul_int(rng.integers(-128, 128, (2, 300), dtype=np.int8), p)
    backend.quantize_activations(np.ones((2, 300), np.float32))

    assert recorder.events("Device") == [("Device",)]
    assert sorted(recorder.events("kernel")) == [("kernel", "quantize"), ("kernel", "ternary_matmul")]  # once each
    assert sorted(e[1] for e in recorder.events("function")) == sorted(shaders.LIBRARY_OF_KERNEL)
    # The weights and their scale were copied to the device once; everything else is pooled.
    copies = [e[2] for e in recorder.events("buffer") if e[1] == "copied"]
    assert copies == [45 * 64 * 2, 45 * 4]

    dispatches = recorder.events("dispatch")
    weights = backend.upload(p)
    for _, name, _, arguments in dispatches:
        assert len(arguments) == BUFFERS_OF_KERNEL[name]
        assert all(isinstance(a, Buffer) for a in arguments)     # no argument copied per call
        if name != "quantize_activations":
            assert arguments[0] is weights.words and arguments[3] is weights.scale
    names_and_counts = [(name, count) for _, name, count, _ in dispatches]
    assert names_and_counts[:4] == [
        ("quantize_activations", 1 * 32), ("ternary_gemv", 1 * 12 * 32),             # ceil(45 / 4) = 12 row blocks
        ("quantize_activations", 3 * 32), ("ternary_gemv", 3 * 12 * 32),
    ]
    assert names_and_counts[4:6] == [("quantize_activations", 37 * 32), ("ternary_gemm", 2 * 2 * 1024)]
    # Each dispatch is waited for (its handle dropped) before the next one is made.
    order = [e[0] for e in recorder.log if e[0] in ("dispatch", "wait")]
    assert order == ["dispatch", "wait"] * len(dispatches)


def test_steady_state_allocates_no_device_memory(recorded, rng):
    recorder, backend = recorded
    p = ternary(rng, 64, 256)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    backend.matmul(x, p)
    allocations = len(recorder.events("buffer"))
    for _ in range(3):
        backend.matmul(x, p)
    assert len(recorder.events("buffer")) == allocations
    assert backend.arena.used_bytes() == 0


# ------------------------------------------------------------------ results through the bridge


@needs_emulation
@pytest.mark.parametrize("width", [32, 1024])
@pytest.mark.parametrize("fmt", ["i2", "hf", "tq2_0"])
def test_bridge_results_match_cpu(rng, width, fmt):
    backend = bridge.MetalBackend(mc_module=metalcompute_module(width))
    granularity = "tensor" if fmt == "hf" else "channel"
    for n, m, k in [(1, 7, 1), (1, 45, 300), (4, 33, 513), (9, 70, 257)]:
        p = ternary(rng, m, k, granularity, fmt)
        x = rng.standard_normal((n, k)).astype(np.float32)
        q, a = backend.quantize_activations(x)
        q_ref, a_ref = bn.quantize_activations(x)
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_array_equal(a, a_ref)
        np.testing.assert_array_equal(backend.matmul_int(q_ref, p), bn.matmul_int(q_ref, p))
        np.testing.assert_allclose(backend.matmul(x, p), bn.matmul(x, p), rtol=3e-7, atol=1e-30)


@needs_emulation
def test_bridge_shapes_out_and_errors(rng):
    backend = bridge.MetalBackend(mc_module=metalcompute_module(64))
    p = ternary(rng, 10, 20)
    x = rng.standard_normal(20).astype(np.float64)          # 1-D, float64: as bn.matmul takes it
    y = backend.matmul(x, p)
    assert y.shape == (10,) and y.dtype == np.float32
    np.testing.assert_allclose(y, bn.matmul(x, p), rtol=3e-7)
    q, a = backend.quantize_activations(x)
    assert q.shape == (20,) and a.shape == (1,)
    out = np.empty(10, np.float32)
    assert backend.matmul(x, p, out=out) is out
    np.testing.assert_array_equal(out, y)
    batch = rng.standard_normal((2, 3, 20)).astype(np.float32)  # leading dimensions are tokens
    np.testing.assert_allclose(backend.matmul(batch, p), bn.matmul(batch, p), rtol=3e-7)
    q_batch = bn.quantize_activations(batch.reshape(6, 20))[0].reshape(2, 3, 20)
    np.testing.assert_array_equal(backend.matmul_int(q_batch, p), bn.matmul_int(q_batch, p))
    nan_row = np.array([[np.nan] * 20, [1.0] * 20], np.float32)
    assert np.isnan(backend.matmul(nan_row, p)[0]).all()
    with pytest.raises(bn.ShapeError, match="21 features"):
        backend.matmul(np.ones(21, np.float32), p)
    with pytest.raises(bn.ShapeError, match="out must have shape"):
        backend.matmul(x, p, out=np.empty(11, np.float32))
    with pytest.raises(bn.DTypeError):
        backend.matmul(np.ones(20, np.int32), p)
    with pytest.raises(bn.DTypeError):
        backend.matmul_int(np.ones(20, np.int16), p)
    grouped = bn.pack(bn.quantize_weights(np.ones((2, 256), np.float32), granularity="group", group_size=256), "tq2_0")
    with pytest.raises(bn.FormatError, match="per-tensor or per-channel"):
        backend.matmul(np.ones(256, np.float32), grouped)


@needs_emulation
def test_bn_matmul_dispatches_to_metal_when_available(monkeypatch, rng):
    backend = bridge.MetalBackend(mc_module=metalcompute_module(128))
    monkeypatch.setattr(bridge, "unavailable_reason", lambda: None)
    monkeypatch.setattr(bridge, "_default", backend)
    assert bn.devices()[:1] == ["cpu"] and "metal" in bn.devices()
    p = ternary(rng, 33, 100)
    x = rng.standard_normal((2, 100)).astype(np.float32)
    np.testing.assert_allclose(bn.matmul(x, p, device="metal"), bn.matmul(x, p), rtol=3e-7)
    assert bridge.upload(p) is backend.upload(p)             # uploaded once, kept in p.cache


# ------------------------------------------------------------------ arena blocks


@needs_emulation
def test_metal_blocks_pool_whole_buffers():
    device = metalcompute_module().Device()
    arena = bn.Arena(backend=MetalBlocks(device))
    big = arena.empty((1000, 1000), np.float32)              # past the size classes: still one whole buffer
    small = arena.empty(10, np.int8)
    for array in (big, small):
        block = arena.block_of(array)
        assert isinstance(block, Buffer) and arena.offset_of(array) == 0
        assert np.shares_memory(np.frombuffer(block, np.uint8), array)
    arena.release(small)
    assert arena.block_of(arena.empty(12, np.int8)) is not None and arena.stats().hits == 1


# ------------------------------------------------------------------ layers


def test_layer_to_metal_uploads_once_and_matches_cpu(monkeypatch, rng):
    if find_compiler() is None:
        pytest.skip(NO_COMPILER)
    from bitnet.nn import BitLinear, scratch

    recorder = Recorder(metalcompute_module(width=64))
    backend = bridge.MetalBackend(mc_module=recorder)
    monkeypatch.setattr(bridge, "unavailable_reason", lambda: None)
    monkeypatch.setattr(bridge, "_default", backend)
    layer = BitLinear.from_float(rng.standard_normal((24, 40)).astype(np.float32), bias=np.ones(24, np.float32))
    x = rng.standard_normal((3, 40)).astype(np.float32)
    with scratch.step():
        expected = layer(x).copy()
    assert layer.to("metal") is layer and layer.device == "metal"
    assert [e[0] for e in recorder.log if e[0] in ("buffer", "dispatch")] == ["buffer", "buffer"]  # weights, scale
    with scratch.step():
        np.testing.assert_allclose(layer(x), expected, rtol=3e-7)
    assert len([e for e in recorder.events("buffer") if e[1] == "copied"]) == 2  # not uploaded again


def test_layer_to_unavailable_device_says_why():
    from bitnet.nn import BitLinear

    layer = BitLinear.from_float(np.ones((2, 4), np.float32))
    if bridge.unavailable_reason() is None:
        pytest.skip("Metal is available here")
    with pytest.raises(bn.DeviceError, match="not available"):
        layer.to("metal")
    assert layer.device == "cpu"


def test_model_to_metal_uploads_each_running_projection_once(monkeypatch, rng):
    if find_compiler() is None:
        pytest.skip(NO_COMPILER)
    from bitnet.models import BitNetConfig, random_model

    config = BitNetConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    model = random_model(config, seed=3, head_dtype="f32")
    ids = np.array([1, 7, 3, 9])
    expected = model.forward(ids)
    recorder = Recorder(metalcompute_module(width=64))
    monkeypatch.setattr(bridge, "unavailable_reason", lambda: None)
    monkeypatch.setattr(bridge, "_default", bridge.MetalBackend(mc_module=recorder))
    assert model.to("metal") is model
    running = list(model.running_linears())
    assert all(lin.device == "metal" for lin in running)
    uploads = len(recorder.events("buffer"))
    assert uploads == 2 * len(running)  # weights and scale of each, nothing for the unstacked parts
    np.testing.assert_allclose(model.forward(ids), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert len([e for e in recorder.events("buffer") if e[1] == "copied"]) == uploads  # not uploaded again

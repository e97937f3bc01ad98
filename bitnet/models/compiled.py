"""The layers of a model as ``bitnet.kernels.decoder`` takes them: one compiled call per step.

:class:`CompiledLayers` holds the address tables of every layer's weights and norms, built
once, and runs a step's layers in one call of :func:`bitnet.kernels.decoder.decoder_layers`,
which computes the bits the layers' own Python (``DecoderLayer._forward``) computes. It
serves the models whose layers it can take (:func:`unsupported` says why not, e.g. a
projection on a GPU backend, a bias, or caches of two dtypes in one batch); the layers'
Python runs the others.

The layers are plain objects a user may change (``linear.to("metal")``, new norm gains), so
the tables remember the count of layer attribute assignments they were built at
(``bitnet.nn.changes``) and the list of layers, and are built again when either moved.
"""

from __future__ import annotations

import numpy as np

from .. import backends
from ..kernels import decoder, matmul, rows
from ..kernels.simd import MARKERS
from ..nn import BitLinear, RMSNorm, changes, scratch
from ..nn.attention import CacheGroup
from ..nn.mlp import NO_NORM
from ..ops import KERNEL_PATH, _kernel_weights, gather_kernel_weights


def unsupported(layers: list, hidden: int) -> str | None:
    """Why ``decoder_layers`` cannot run ``layers`` over a residual stream of ``hidden`` features, or None.

    It takes layers alike in every shape, with q/k/v and gate/up stacked into one projection
    each, every projection on the CPU without a bias or an input norm: the layers every
    loader builds for the CPU. The shapes are checked here because the kernels check none.
    """
    first, inner = layers[0].attention, layers[0].mlp.down_proj.in_features
    heads, kv_heads, d = first.heads, first.kv_heads, first.head_dim
    shapes = ((heads + 2 * kv_heads) * d, hidden), (hidden, heads * d), (2 * inner, hidden), (hidden, inner)
    sub_norms = first.sub_norm is not None
    norm_sizes = (hidden, hidden) + ((heads * d, inner) if sub_norms else (None, None))
    for index, layer in enumerate(layers):
        attention, mlp = layer.attention, layer.mlp
        linears = tuple(linear for _, linear in _projections(layer))
        if any(linear is None for linear in linears):
            return f"layer {index} keeps q/k/v or gate/up as separate projections"
        if any(linear.device != backends.CPU or linear.bias is not None or linear.input_norm is not None
               for linear in linears):
            return f"a projection of layer {index} runs on another device or has a bias or an input norm"
        if (attention.heads, attention.kv_heads, attention.head_dim, attention.rope, attention.scaling) != (
                heads, kv_heads, d, first.rope, first.scaling):
            return f"layer {index} has another head layout or rotary embedding than layer 0"
        if tuple((linear.out_features, linear.in_features) for linear in linears) != shapes:
            return f"the projections of layer {index} are not shaped as layer 0's over {hidden} features"
        norms = (layer.input_norm, layer.post_attention_norm, attention.sub_norm, mlp.sub_norm)
        if tuple(None if norm is None else norm.weight.shape[0] for norm in norms) != norm_sizes:
            return f"the norms of layer {index} are not shaped as layer 0's"
    return None


def _projections(layer) -> tuple[tuple[int, BitLinear], ...]:
    """``(which, linear)`` for the projections of ``layer``, as ``decoder`` numbers them."""
    attention, mlp = layer.attention, layer.mlp
    return ((decoder.QKV, attention.qkv_proj), (decoder.O, attention.o_proj), (decoder.GATE_UP, mlp.gate_up_proj),
            (decoder.DOWN, mlp.down_proj))


class CompiledLayers:
    """The tables of ``layers`` (over ``hidden`` features) for ``decoder_layers`` on kernel path ``path``.

    ``reason`` is why it cannot run them (:func:`unsupported`), or None; :meth:`current` says
    whether the layers are still those it was built from.
    """

    def __init__(self, layers: list, hidden: int, path: str = KERNEL_PATH) -> None:
        self.changes = changes.count()  # first: an assignment while the tables are built makes them stale
        self.layers = list(layers)
        self.path = path
        self.reason = unsupported(layers, hidden)
        if self.reason is not None:
            return
        first = layers[0]
        self.attention, self.mlp = first.attention, first.mlp
        self.weights = np.zeros((len(layers), 4, decoder.WEIGHT_FIELDS), np.int64)
        self.norms = np.zeros((len(layers), 4), np.int64)
        self.eps = np.zeros((len(layers), 4), np.float32)
        self._alive: list[np.ndarray] = []  # every array the tables point into
        parts = [linear.weight for layer in layers for linear in (*layer.attention.projections, *layer.mlp.projections)]
        gather_kernel_weights([linear.weight for layer in layers for _, linear in _projections(layer)], parts, path)
        for index, layer in enumerate(layers):
            attention, mlp = layer.attention, layer.mlp
            for which, linear in _projections(layer):
                self._add_projection(index, which, linear)
            for which, norm in ((decoder.INPUT_NORM, layer.input_norm),
                                (decoder.POST_ATTENTION_NORM, layer.post_attention_norm),
                                (decoder.ATTENTION_SUB_NORM, attention.sub_norm),
                                (decoder.FFN_SUB_NORM, mlp.sub_norm)):
                self._add_norm(index, which, norm)
        self.k_padded = {which: _kernel_weights(linear.weight, path)[3] for which, linear in
                         ((decoder.QKV, self.attention.qkv_proj), (decoder.O, self.attention.o_proj),
                          (decoder.DOWN, self.mlp.down_proj))}
        self.data_template = self._alive[0][:0]

    def _add_projection(self, index: int, which: int, linear: BitLinear) -> None:
        data, scale, scale_step, _ = _kernel_weights(linear.weight, self.path)
        self._alive += (data, scale)
        self.weights[index, which] = (data.ctypes.data, *data.shape, scale.ctypes.data, scale.shape[0], scale_step)

    def _add_norm(self, index: int, which: int, norm: RMSNorm | None) -> None:
        weight, eps = (NO_NORM, 0.0) if norm is None else (norm.weight, norm.eps)
        self._alive.append(weight)
        self.norms[index, which] = weight.ctypes.data
        self.eps[index, which] = eps

    def current(self, layers: list) -> bool:
        """Whether ``layers`` are exactly what the tables were built from."""
        return changes.count() == self.changes and layers == self.layers  # layers compare by identity

    def run(self, x: np.ndarray, group: CacheGroup, end: int) -> None:
        """Run every layer over ``x`` (``(n, hidden)`` float32, C-contiguous, updated in place) for the
        sequences of ``group`` (all of the step's), whose caches hold at most ``end`` positions after it."""
        attention, mlp = self.attention, self.mlp
        n, heads = x.shape[0], attention.heads
        attention.rope.reserve(end)
        b = self._buffers(n)
        decoder.decoder_layers(
            MARKERS[self.path], x, self.weights, self.norms, self.eps, self.data_template, mlp.activation == "silu",
            attention.sub_norm is not None, rows.threaded(n), heads, attention.kv_heads, attention.rope.cos,
            attention.rope.sin, group.rows, group.tables, group.template, attention.scaling, group.threaded,
            tuple(group.scratch(heads)), b["normed"], b["qkv"], b["queries"], b["context"], b["context_normed"],
            b["attended"], b["gate_up"], b["hidden"], b["down"], *self._workspaces(n),
        )

    def projection_inputs(self, n: int) -> list[np.ndarray]:
        """The buffers :meth:`run_projections` reads for ``n`` rows: the inputs of q|k|v and gate|up, of o, of down."""
        b = self._buffers(n)
        return [b["normed"], b["context"], b["hidden"]]

    def run_projections(self, n: int) -> None:
        """Only the projections of a step of ``n`` rows, as :meth:`run` makes them (``decoder_projections``):
        the matmul time of a step. Call it inside a ``scratch.step()``, after filling :meth:`projection_inputs`."""
        b = self._buffers(n)
        decoder.decoder_projections(MARKERS[self.path], self.weights, self.data_template, self.eps[0], b["normed"],
                                    b["qkv"], b["context"], b["attended"], b["gate_up"], b["hidden"], b["down"],
                                    *self._workspaces(n))

    def _buffers(self, n: int) -> dict[str, np.ndarray]:
        """The float32 step temporaries of ``decoder_layers`` for ``n`` rows, by argument name."""
        attention, inner = self.attention, self.mlp.down_proj.in_features
        width, heads, d = attention.o_proj.out_features, attention.heads, attention.head_dim
        shapes = {"normed": (n, width), "qkv": (n, attention.qkv_proj.out_features), "queries": (n, heads, d),
                  "context": (n, heads * d), "context_normed": (n, heads * d), "attended": (n, width),
                  "gate_up": (n, 2 * inner), "hidden": (n, inner), "down": (n, width)}
        return {name: scratch.reused(f"decoder.{name}", shape, np.float32) for name, shape in shapes.items()}

    def _workspaces(self, n: int) -> list[tuple]:
        """The matmul workspaces of the inputs of q|k|v and gate|up, of o and of down, for ``n`` rows."""
        return [self._workspace(n, self.k_padded[which]) for which in (decoder.QKV, decoder.O, decoder.DOWN)]

    def _workspace(self, n: int, k_padded: int) -> tuple:
        """``matmul_float``'s workspace for ``n`` rows of ``k_padded`` features: step temporaries."""
        scratch_arrays = tuple(scratch.reused(f"decoder.matmul_scratch_{i}", shape, dtype)
                               for i, (shape, dtype) in enumerate(matmul.scratch_shapes(self.path, n, k_padded)))
        return (scratch.reused("decoder.q", (n, k_padded), np.int8), scratch.reused("decoder.act_scale", (n,)),
                scratch.reused("decoder.q_sum", (n,), np.int32), matmul.NO_ACC, scratch_arrays)

"""A model's stack of decoder layers in one compiled call: the CPU path of a forward step.

Between two matmuls a layer does little (a norm, rope, attention), and a decode step runs
30 layers of 10 kernels each: called from Python, those 300 calls and the code between them
cost ~3 ms a step in situ, where the weights streaming through evict the interpreter's data
(NOTES.md). :func:`decoder_layers` makes the same calls to the same compiled kernels, in the
same order, from a loop over the layers, so it computes the same bits as the layers' own
Python (``bitnet.models.bitnet.DecoderLayer``) with none of that cost.

It takes every layer's weights in two tables of addresses (:mod:`addresses`): ``weights``,
int64 ``(layers, 4, WEIGHT_FIELDS)`` for the q|k|v, o, gate|up and down projections in one
path's layout, and ``norms``, int64 ``(layers, 4)`` for the input, post-attention, attention
sub- and FFN sub-norm gains (where the family has no sub-norms, a one-element array the
kernels do not read), with their ``eps`` as float32 ``(layers, 4)``. The caller
(``bitnet.models.compiled``) keeps the arrays alive and checks every shape once, when it
builds the tables.
"""

from __future__ import annotations

from numba import njit

from . import attention, rows
from .addresses import array_at
from .matmul import matmul_float

_KERNEL = dict(error_model="numpy", cache=True, nogil=True, boundscheck=False)
# The helpers are inlined into ``decoder_layers`` (Numba IR), which then links each kernel it calls
# once: a compiled caller links its callees' code and optimizes all of it again, so every level of
# calls in between would optimize the matmul and attention kernels once more. For the same reason the
# ISA marker is an argument, not closed over by per-path entry points: one type dispatch a step.
_INLINED = dict(_KERNEL, inline="always")

# The projections of a layer, as ``weights`` holds them, and the fields of each.
QKV, O, GATE_UP, DOWN = range(4)
DATA, DATA_ROWS, DATA_COLUMNS, SCALE, SCALE_LENGTH, SCALE_STEP = range(6)
WEIGHT_FIELDS = 6
# The norms of a layer, as ``norms`` and ``eps`` hold them.
INPUT_NORM, POST_ATTENTION_NORM, ATTENTION_SUB_NORM, FFN_SUB_NORM = range(4)

# Module-level names, so that the compiled code refers to each build (Numba cannot read a namespace).
# Each switch between the builds below is written out: one generic ``f(threaded, *args)`` cannot be
# inlined (Numba's inliner takes no ``*args``), and compiled on its own it would be one more level.
_rms_norm_serial, _rms_norm_parallel = rows.serial.rms_norm, rows.parallel.rms_norm
_add_rms_norm_serial, _add_rms_norm_parallel = rows.serial.add_rms_norm, rows.parallel.add_rms_norm
_gated_serial, _gated_parallel = rows.serial.gated_activation, rows.parallel.gated_activation
_rope_serial, _rope_parallel = attention.serial.rope_into_caches, attention.parallel.rope_into_caches
_attention_serial, _attention_parallel = attention.serial.causal_attention, attention.parallel.causal_attention


@njit(**_INLINED)
def _rms_norm(threaded, x, weight, eps, out):
    if threaded:
        _rms_norm_parallel(x, weight, eps, out)
    else:
        _rms_norm_serial(x, weight, eps, out)


@njit(**_INLINED)
def _add_rms_norm(threaded, x, delta, weight, eps, out):
    if threaded:
        _add_rms_norm_parallel(x, delta, weight, eps, out)
    else:
        _add_rms_norm_serial(x, delta, weight, eps, out)


@njit(**_INLINED)
def _gated_activation(threaded, gate_up, silu, weight, eps, normalize, out):
    if threaded:
        _gated_parallel(gate_up, silu, weight, eps, normalize, out)
    else:
        _gated_serial(gate_up, silu, weight, eps, normalize, out)


@njit(**_INLINED)
def _rope(threaded, qkv, heads, kv_heads, cos, sin, query_rows, tables, layer, template, queries):
    if threaded:
        _rope_parallel(qkv, heads, kv_heads, cos, sin, query_rows, tables, layer, template, queries)
    else:
        _rope_serial(qkv, heads, kv_heads, cos, sin, query_rows, tables, layer, template, queries)


@njit(**_INLINED)
def _attention(isa, threaded, queries, query_rows, tables, layer, template, scaling, scratch, out):
    scores, chunk_max, chunk_sum, chunk_context = scratch
    if threaded:
        _attention_parallel(isa, queries, query_rows, tables, layer, template, scaling, scores, chunk_max, chunk_sum,
                            chunk_context, out)
    else:
        _attention_serial(isa, queries, query_rows, tables, layer, template, scaling, scores, chunk_max, chunk_sum,
                          chunk_context, out)


@njit(**_INLINED)
def _norm(norms, layer, which, size, template):
    return array_at(norms[layer, which], (size,), template)


@njit(**_INLINED)
def _project(isa, weights, layer, which, x, data_template, scale_template, workspace, out):
    """``out = x @ W.T`` for projection ``which`` of ``layer``."""
    fields = weights[layer, which]
    data = array_at(fields[DATA], (fields[DATA_ROWS], fields[DATA_COLUMNS]), data_template)
    scale = array_at(fields[SCALE], (fields[SCALE_LENGTH],), scale_template)
    matmul_float(isa, x, data, scale, fields[SCALE_STEP], workspace, out)


@njit(**_KERNEL)
def decoder_layers(isa, x, weights, norms, eps, data_template, silu, sub_norms, threaded_rows, heads, kv_heads, cos,
                   sin, query_rows, tables, cache_template, scaling, threaded_attention, attention_scratch, normed, qkv,
                   queries, context, context_normed, attended, gate_up, hidden, down, hidden_workspace,
                   context_workspace, inner_workspace):
    """Run every layer of ``weights`` over the residual stream ``x`` (``(n, hidden)`` float32, updated in place).

    Each layer: ``normed = input_norm(x)``; ``qkv`` projected from it; rope writes the keys and
    values into the caches and the rotated queries into ``queries``; attention (arguments as
    ``attention.causal_attention`` takes them, ``attention_scratch`` its four scratch arrays)
    writes ``context``; the attention sub-norm (if ``sub_norms``) into ``context_normed``; the o
    projection into ``attended``; ``x += attended`` and ``normed = post_attention_norm(x)``;
    ``gate_up`` projected; the gated activation (``silu`` or relu2, then the FFN sub-norm) into
    ``hidden``; the down projection into ``down``; ``x += down``. The row kernels and rope run
    threaded when ``threaded_rows``, attention when ``threaded_attention``. The workspaces are
    ``matmul_float``'s for the inputs of q|k|v and gate|up (``hidden`` features), of o (the
    attention's) and of down (the MLP's).
    """
    n, width = x.shape
    scale_template = eps[0]  # any float32 array: ``array_at`` takes only its dtype
    for layer in range(weights.shape[0]):
        _rms_norm(threaded_rows, x, _norm(norms, layer, INPUT_NORM, width, scale_template), eps[layer, INPUT_NORM],
                  normed)
        _project(isa, weights, layer, QKV, normed, data_template, scale_template, hidden_workspace, qkv)
        _rope(threaded_rows, qkv, heads, kv_heads, cos, sin, query_rows, tables, layer, cache_template, queries)
        _attention(isa, threaded_attention, queries, query_rows, tables, layer, cache_template, scaling,
                   attention_scratch, context)
        projected = context
        if sub_norms:
            _rms_norm(threaded_rows, context,
                      _norm(norms, layer, ATTENTION_SUB_NORM, context.shape[1], scale_template),
                      eps[layer, ATTENTION_SUB_NORM], context_normed)
            projected = context_normed
        _project(isa, weights, layer, O, projected, data_template, scale_template, context_workspace, attended)
        _add_rms_norm(threaded_rows, x, attended, _norm(norms, layer, POST_ATTENTION_NORM, width, scale_template),
                      eps[layer, POST_ATTENTION_NORM], normed)
        _project(isa, weights, layer, GATE_UP, normed, data_template, scale_template, hidden_workspace, gate_up)
        inner = hidden.shape[1]
        ffn_norm = _norm(norms, layer, FFN_SUB_NORM, inner if sub_norms else 1, scale_template)
        _gated_activation(threaded_rows, gate_up, silu, ffn_norm, eps[layer, FFN_SUB_NORM], sub_norms, hidden)
        _project(isa, weights, layer, DOWN, hidden, data_template, scale_template, inner_workspace, down)
        for i in range(n):
            for j in range(width):
                x[i, j] += down[i, j]


@njit(**_KERNEL)
def decoder_projections(isa, weights, data_template, scale_template, normed, qkv, context, attended, gate_up, hidden,
                        down, hidden_workspace, context_workspace, inner_workspace):
    """The projections of ``decoder_layers`` alone, in its order, with its arguments, on whatever their
    input buffers hold: what a step spends in the matmuls, for bench-model to set apart from the rest."""
    for layer in range(weights.shape[0]):
        _project(isa, weights, layer, QKV, normed, data_template, scale_template, hidden_workspace, qkv)
        _project(isa, weights, layer, O, context, data_template, scale_template, context_workspace, attended)
        _project(isa, weights, layer, GATE_UP, normed, data_template, scale_template, hidden_workspace, gate_up)
        _project(isa, weights, layer, DOWN, hidden, data_template, scale_template, inner_workspace, down)

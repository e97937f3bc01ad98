"""Random-weight models of any BitNet shape, built straight from random packed bytes.

Used for benchmarks (the 2B4T shapes without an 8 GB float detour) and for tests that
need no checkpoint: ternary weights are drawn as packed bytes, the embedding table row
block by row block, so the peak memory is the model itself.
"""

from __future__ import annotations

import numpy as np

from ..formats import PackedTernary, convert, get_format, pack
from ..formats.i2 import BLOCK
from ..nn import BitLinear, Embedding
from ..nn.embedding import float_to_bf16_bits, int8_rows
from ..ops import WEIGHT_FORMAT
from ..quant import TernaryTensor
from .bitnet import BitNetForCausalLM, build_layers
from .config import BitNetConfig

# The 81 bytes whose four 2-bit fields all hold a ternary code + 1 (0, 1 or 2).
_VALID_I2_BYTES = np.array(
    [a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3) for d in range(3)], np.uint8
)
_EMBEDDING_ROWS_PER_BLOCK = 1024  # a multiple of 16, as Embedding.int8_from_blocks takes them


def random_linear(rng: np.random.Generator, out_features: int, in_features: int) -> BitLinear:
    """A BitLinear with uniform random ternary codes and scale ``1 / sqrt(in_features)`` (outputs ~ unit size)."""
    return random_linears(rng, [out_features], in_features)[0]


def random_linears(rng: np.random.Generator, out_features: list[int], in_features: int) -> list[BitLinear]:
    """BitLinears sharing an input, their packed rows drawn as one ``i2`` array and repacked at once into
    the CPU kernels' format (``bn.ops.WEIGHT_FORMAT``), so that they stack without a copy; the same
    seed gives the same network on every CPU."""
    scale = np.asarray(1.0 / np.sqrt(in_features), np.float32)
    rows = sum(out_features)
    if in_features % BLOCK == 0:
        data = np.empty((rows, in_features // 4), np.uint8)
        for start in range(0, rows, 1024):  # small random blocks: no model-sized temporary
            block = data[start : start + 1024]
            np.take(_VALID_I2_BYTES, rng.integers(0, len(_VALID_I2_BYTES), block.shape, dtype=np.uint8), out=block)
    else:
        codes = rng.integers(-1, 2, (rows, in_features), dtype=np.int8)
        data = pack(TernaryTensor(codes, scale), "i2").data
    # Repacked at once where the layers end on the format's row groups; otherwise BitLinear repacks each.
    fmt = WEIGHT_FORMAT if get_format(WEIGHT_FORMAT).row_slices(out_features) is not None else "i2"
    data = convert(PackedTernary("i2", (rows, in_features), data, scale), fmt).data
    return [BitLinear(PackedTernary(fmt, (out, in_features), data[part], scale))
            for out, part in zip(out_features, get_format(fmt).row_slices(out_features), strict=True)]


def random_table(rng: np.random.Generator, rows: int, cols: int, dtype: str) -> Embedding:
    """A random normal ``(rows, cols)`` embedding stored as ``dtype``, generated in row blocks.

    Blocks, because a whole float32 table first would double the peak memory of a 16-bit or
    int8 one (2.5 GiB instead of 1.3 for the 2B4T head in f16).
    """
    kind = "f32" if dtype == "auto" else dtype
    starts = range(0, rows, _EMBEDDING_ROWS_PER_BLOCK)
    blocks = (rng.standard_normal((min(_EMBEDDING_ROWS_PER_BLOCK, rows - start), cols), np.float32) for start in starts)
    if kind == "int8":
        return Embedding.int8_from_blocks((int8_rows(block) for block in blocks), (rows, cols))
    stored = np.empty((rows, cols), {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[kind])
    for start, block in zip(starts, blocks, strict=True):
        stored[start : start + block.shape[0]] = float_to_bf16_bits(block) if kind == "bf16" else block
    return Embedding(stored, kind)


def random_model(config: BitNetConfig, seed: int = 0, head_dtype: str = "bf16") -> BitNetForCausalLM:
    """A :class:`BitNetForCausalLM` of ``config``'s shapes with random weights (norm gains 1).

    Parameters
    ----------
    config : the architecture (e.g. ``BitNetConfig()`` for the 2B4T shapes).
    seed : seed of the weights.
    head_dtype : storage of the embedding / head: "f32", "f16", "bf16" or "int8".
    """
    rng = np.random.default_rng(seed)
    c = config
    weights: dict[str, object] = {}
    ones = {size: np.ones(size, np.float32) for size in set(c.norm_shapes().values())}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes = c.linear_shapes()
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                      ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)):
            linears = random_linears(rng, [shapes[name][0] for name in group], shapes[group[0]][1])
            weights.update({p + name: linear for name, linear in zip(group, linears, strict=True)})
        for norm, size in c.norm_shapes().items():
            weights[f"{p}{norm}.weight"] = ones[size]
    weights["model.norm.weight"] = ones[c.hidden_size]
    layers, norm = build_layers(c, weights)
    embed = random_table(rng, c.vocab_size, c.hidden_size, head_dtype)
    head = None if c.tie_word_embeddings else random_table(rng, c.vocab_size, c.hidden_size, head_dtype)
    return BitNetForCausalLM(c, embed, layers, norm, head)

"""Random calls of the public API, run in a child process by ``test_fuzz_api.py``.

``python tests/fuzz_api.py TARGET SEED CASES`` makes ``CASES`` calls of ``TARGET`` with
arguments drawn from ``SEED``: random shapes (empty, one row, odd), dtypes (every numpy
kind), values (NaN, Inf, huge, negative, zeros) and plain wrong Python values (None,
strings, floats where ints belong). Each call must return or raise ``bn.BitNetError``.
Before each call the case number goes to stdout, so a crash (a signal: the parent sees a
negative exit code) names the case to replay; any other exception is printed with its
case and the script exits with 1.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

import numpy as np

import bitnet as bn
from bitnet.models.random import random_model

DTYPES = (np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
          np.uint32, np.bool_, np.complex64)
JUNK = (None, "x", 1.5, -1, 0, 2**40, -(2**63), float("nan"), float("inf"), [], [1, 2], (3,), {}, b"\x00",
        np.float32(2.5), np.int64(7), object())
SIZES = (0, 1, 2, 3, 7, 64, 255, 256, 257)
FORMAT_NAMES = sorted(bn.FORMATS)


def size(rng) -> int:
    return int(rng.choice(SIZES))


def junk(rng) -> object:
    return JUNK[int(rng.integers(len(JUNK)))]


def array(rng, shape: tuple[int, ...] | None = None, dtype=None) -> np.ndarray:
    """A random array: often odd (empty, 0-d, wrong dtype, non-contiguous), with NaN/Inf/huge values mixed in."""
    if shape is None:
        shape = tuple(size(rng) for _ in range(int(rng.integers(0, 4))))
    dtype = dtype if dtype is not None and rng.random() < 0.8 else DTYPES[int(rng.integers(len(DTYPES)))]
    values = np.asarray(rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4))
    special = rng.random(shape) < 0.05
    values[special] = rng.choice([np.nan, np.inf, -np.inf, 1e30, 0.0], int(special.sum()))
    with np.errstate(all="ignore"):
        out = values.astype(dtype)
    if out.ndim and rng.random() < 0.15:
        out = np.repeat(out, 2, axis=-1)[..., ::2]  # same values, not contiguous
    return out


def maybe(rng, good: Callable[[], object], p_junk: float = 0.3) -> object:
    """Usually ``good()``, sometimes a junk value."""
    return junk(rng) if rng.random() < p_junk else good()


def ternary(rng, m: int | None = None, k: int | None = None) -> bn.TernaryTensor:
    m = m or max(1, size(rng))
    k = k or max(1, size(rng))
    return bn.quantize_weights(rng.standard_normal((m, k)).astype(np.float32))


def packed(rng, m: int | None = None, k: int | None = None) -> bn.PackedTernary:
    return bn.pack(ternary(rng, m, k), str(rng.choice(FORMAT_NAMES)))


def fuzz_quantize(rng) -> None:
    bn.quantize_weights(maybe(rng, lambda: array(rng, dtype=np.float32)),
                        granularity=maybe(rng, lambda: str(rng.choice(["tensor", "channel", "group", "row"])), 0.1),
                        group_size=maybe(rng, lambda: int(rng.choice([1, 3, 64, 256])), 0.5),
                        method=maybe(rng, lambda: str(rng.choice(["absmean", "threshold", "uniform", "bogus"])), 0.1))
    bn.quantize_activations(maybe(rng, lambda: array(rng, dtype=np.float32)))


def fuzz_formats(rng) -> None:
    t = maybe(rng, lambda: ternary(rng), 0.2)
    p = bn.pack(t, maybe(rng, lambda: str(rng.choice([*FORMAT_NAMES, "bogus"])), 0.1))
    bn.unpack(maybe(rng, lambda: p, 0.3))
    bn.convert(maybe(rng, lambda: p, 0.2), maybe(rng, lambda: str(rng.choice(FORMAT_NAMES)), 0.2))
    m, k = p.shape
    bn.PackedTernary(maybe(rng, lambda: p.format, 0.1), maybe(rng, lambda: (m, k), 0.2),
                     maybe(rng, lambda: array(rng, p.data.shape, np.uint8), 0.2),
                     maybe(rng, lambda: array(rng, np.shape(p.scale), np.float32), 0.2))


def fuzz_matmul(rng) -> None:
    p = packed(rng)
    m, k = p.shape
    n = size(rng)
    x = maybe(rng, lambda: array(rng, (n, k) if rng.random() < 0.8 else (k,), np.float32), 0.2)
    out = array(rng, (n, m), np.float32) if rng.random() < 0.3 else None
    path = maybe(rng, lambda: None, 0.2)
    bn.matmul(x, maybe(rng, lambda: p, 0.1), out=out, path=path)
    q = maybe(rng, lambda: array(rng, (n, k), np.int8), 0.2)
    bn.matmul_int(q, maybe(rng, lambda: p, 0.1))


def fuzz_layers(rng) -> None:
    vocab, hidden = max(1, size(rng)), max(1, size(rng))
    table = maybe(rng, lambda: array(rng, (vocab, hidden), np.float32), 0.2)
    embedding = bn.nn.Embedding(table, maybe(rng, lambda: str(rng.choice(["f32", "f16", "bf16", "int8"])), 0.2))
    embedding.rows(maybe(rng, lambda: rng.integers(-3, vocab + 3, size(rng)), 0.3))
    embedding.logits(maybe(rng, lambda: array(rng, (size(rng), hidden), np.float32), 0.2))
    norm = bn.nn.RMSNorm(maybe(rng, lambda: array(rng, (max(1, size(rng)),), np.float32), 0.2))
    norm(maybe(rng, lambda: array(rng, (size(rng), max(1, size(rng))), np.float32), 0.2))
    p = packed(rng)
    linear = bn.nn.BitLinear(maybe(rng, lambda: p, 0.1), maybe(rng, lambda: None, 0.5))
    linear(maybe(rng, lambda: array(rng, (size(rng), p.shape[1]), np.float32), 0.3))
    layers, kv_heads, head_dim = (maybe(rng, lambda: max(1, size(rng) % 4), 0.1) for _ in range(3))
    dtype = maybe(rng, lambda: str(rng.choice(["float32", "float16"])), 0.1)
    cache = bn.nn.KVCache(layers, kv_heads, head_dim, maybe(rng, lambda: max(1, size(rng)), 0.2),
                          maybe(rng, lambda: None, 0.5), dtype)
    cache.reserve(maybe(rng, lambda: size(rng), 0.4))  # junk includes 2**40 positions: OutOfMemoryError


def fuzz_int8_table(rng) -> None:
    """An int8 table filled block by block (stored 16 rows per vector on AVX-512 VNNI), then used."""
    vocab, hidden = max(1, size(rng)), max(1, size(rng))
    cuts = sorted({0, vocab, *(16 * int(c) for c in rng.integers(0, vocab // 16 + 1, 2))} & set(range(vocab + 1)))
    blocks = [maybe(rng, lambda a=a, b=b: (array(rng, (b - a, hidden), np.int8), array(rng, (b - a,), np.float32)), 0.1)
              for a, b in zip(cuts, cuts[1:], strict=False)]
    table = bn.nn.Embedding.int8_from_blocks(maybe(rng, lambda: blocks, 0.1), maybe(rng, lambda: (vocab, hidden), 0.2))
    table.rows(maybe(rng, lambda: rng.integers(-3, vocab + 3, size(rng)), 0.3))
    table.logits(maybe(rng, lambda: array(rng, (size(rng), hidden), np.float32), 0.2))


CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "rope_scaling")
SMALL = dict(model_type="bitnet", vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0,
             eos_token_id=1)


def fuzz_config(rng) -> None:
    raw = dict(SMALL)
    for key in rng.choice(CONFIG_KEYS, int(rng.integers(0, 4)), replace=False):
        raw[str(key)] = junk(rng)
    bn.BitNetConfig.from_dict(raw)


def changed_part(rng, model) -> tuple[object, str]:
    """A part of the model's layer and one of its attributes, for a case to assign something else to."""
    layer = model.layers[0]
    attention, mlp = layer.attention, layer.mlp
    parts = [(layer, "input_norm"), (layer, "mlp"), (layer.input_norm, "weight"), (layer.input_norm, "eps"),
             (attention, "o_proj"), (attention, "qkv_proj"), (attention, "heads"), (attention, "head_dim"),
             (attention, "projections"), (attention, "scaling"), (attention.sub_norm, "weight"),
             (attention.o_proj, "bias"), (attention.o_proj, "input_norm"), (attention.o_proj, "weight"),
             (mlp, "down_proj"), (mlp, "gate_up_proj"), (mlp, "activation"), (mlp.sub_norm, "weight"),
             (mlp.down_proj, "bias")]
    return parts[int(rng.integers(len(parts)))]


def fuzz_model(rng, model=None) -> None:
    model = model or FUZZ_MODEL
    if rng.random() < 0.2:  # a layer changed after construction: the model checks it again before it runs
        owner, name = changed_part(rng, model)
        kept = getattr(owner, name)
        value = [junk(rng), array(rng), bn.nn.BitLinear(packed(rng))][int(rng.integers(3))]
        setattr(owner, name, value)
        try:
            _fuzz_model(rng, model)
        finally:
            setattr(owner, name, kept)
    else:
        _fuzz_model(rng, model)


def _ids(rng) -> np.ndarray:
    """Token ids, often all valid: one bad id in many would keep long inputs from ever reaching the model."""
    low, high = (-2, SMALL["vocab_size"] + 4) if rng.random() < 0.3 else (0, SMALL["vocab_size"])
    return rng.integers(low, high, size(rng) or 1)


def _fuzz_model(rng, model) -> None:
    ids = maybe(rng, lambda: _ids(rng), 0.2)
    kind = rng.integers(5)
    if kind == 0:
        model(ids)
    elif kind == 1:
        model.generate(ids, maybe(rng, lambda: int(rng.integers(0, 40)), 0.3),
                       temperature=maybe(rng, lambda: float(rng.choice([0.0, 0.7, 2.0])), 0.3),
                       top_k=maybe(rng, lambda: None, 0.3), top_p=maybe(rng, lambda: None, 0.3),
                       seed=maybe(rng, lambda: int(rng.integers(100)), 0.3),
                       stop=maybe(rng, lambda: None, 0.3))
    elif kind == 2:
        other = OTHER_MODEL if rng.random() < 0.5 else model
        model(ids, cache=maybe(rng, lambda: other.new_cache(int(rng.integers(1, 8))), 0.2))
    elif kind == 3:  # several sequences: float16 and float32 caches mixed, some released, shared, of the other
        caches = []  # model or with a length the caller set
        for _ in range(int(rng.integers(0, 4))):
            model.kv_dtype = maybe(rng, lambda: str(rng.choice(["float16", "float32"])), 0.1)
            caches.append((OTHER_MODEL if rng.random() < 0.1 else model).new_cache(int(rng.integers(1, 8))))
        if caches and rng.random() < 0.2:
            caches[0].release()
        if caches and rng.random() < 0.1:
            caches.append(caches[-1])
        if caches and rng.random() < 0.2:
            caches[-1].length = maybe(rng, lambda: int(rng.integers(-2, 12)), 0.2)
        sequences = [maybe(rng, lambda: _ids(rng), 0.2) for _ in range(len(caches))]
        model.forward_batch(maybe(rng, lambda: sequences, 0.1), caches)
    else:  # one decoder layer on its own: the model runs it unchecked, a caller gets its checks
        layer = model.layers[0]
        rows = int(rng.integers(1, 9))
        caches = [(OTHER_MODEL if rng.random() < 0.2 else model).new_cache(int(rng.integers(1, 8)))
                  for _ in range(int(rng.integers(1, 3)))]
        cut = int(rng.integers(0, rows + 1)) if len(caches) == 2 else rows  # 0 or rows: a row slice is empty
        sequences = [(caches[0], slice(0, cut)), (caches[-1], slice(cut, rows))][: len(caches)]
        for cache, part in sequences:
            if rng.random() < 0.8:  # room for its rows, as the model reserves it; else the layer refuses
                cache.reserve(part.stop - part.start)
        x = maybe(rng, lambda: array(rng, (rows, model.config.hidden_size), np.float32), 0.1)
        if isinstance(x, np.ndarray) and rng.random() < 0.1:
            x.flags.writeable = False
        index = 0 if rng.random() < 0.8 else int(rng.integers(-1, 3))  # the model has one layer
        layer(x, maybe(rng, lambda: sequences, 0.1), maybe(rng, lambda: index, 0.1))


def fuzz_arena(rng) -> None:
    arena = bn.Arena()
    with arena.frame():
        arena.empty(maybe(rng, lambda: (size(rng), size(rng)), 0.4), maybe(rng, lambda: np.float32, 0.4))
    arena.release(maybe(rng, lambda: arena.empty((2,), np.float32), 0.5))


FUZZ_MODEL = OTHER_MODEL = None
TARGETS = {"quantize": fuzz_quantize, "formats": fuzz_formats, "matmul": fuzz_matmul, "layers": fuzz_layers,
           "int8_table": fuzz_int8_table,
           "config": fuzz_config, "model": fuzz_model, "arena": fuzz_arena}


def main(target: str, seed: int, cases: int) -> int:
    global FUZZ_MODEL, OTHER_MODEL
    if target == "model":
        FUZZ_MODEL = random_model(bn.BitNetConfig.from_dict(SMALL), seed=1)
        OTHER_MODEL = random_model(bn.BitNetConfig.from_dict({**SMALL, "num_key_value_heads": 1}), seed=2)
    for case in range(cases):
        print(f"case {case}", flush=True)
        rng = np.random.default_rng([seed, case])
        try:
            TARGETS[target](rng)
        except bn.BitNetError:
            pass
        except Exception:
            print(f"FAILED {target} seed {seed} case {case}: not a BitNetError\n{traceback.format_exc()}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))

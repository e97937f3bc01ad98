"""The head and embedding-row kernels of every table dtype against plain numpy, and their assembly.

Logits are float32 sums in the kernel's own (vectorized) order, so they are compared with the
bound any order of summing ``width`` float32 products obeys; the widening itself is checked
exactly (rows, and logits of one-hot hidden states, where a single product is nonzero).
"""

from __future__ import annotations

import re

import numba
import numpy as np
import pytest
from conftest import ALL_PATHS, AVX512_ASM, fresh_asm
from numba import types
from numba.extending import intrinsic

import bitnet as bn
from bitnet.kernels import head as head_kernels
from bitnet.kernels import simd
from bitnet.kernels.simd import BF16_WORDS, F16_WORDS, F32_VALUES
from bitnet.nn import Embedding

WORD_DTYPES = ["f16", "bf16"]


def stored_floats(table: Embedding) -> np.ndarray:
    """The table's values as float32, widened by numpy (the reference for the kernels)."""
    if table.dtype == "bf16":
        return (table.table.astype(np.uint32) << 16).view(np.float32)
    if table.dtype == "int8":
        return table.table.astype(np.float32) * table.row_scale[:, None]
    return table.table.astype(np.float32)


def assert_logits_close(logits, h, weights):
    """``logits == h @ weights.T`` up to float32 rounding in any summation order:
    ``|error| <= width * 2**-24 * sum_j |h_j w_j|`` (plus a subnormal's worth)."""
    h64, w64 = h.astype(np.float64), weights.astype(np.float64)
    bound = h.shape[1] * 2.0**-24 * (np.abs(h64) @ np.abs(w64).T) + 1e-30
    assert np.all(np.abs(logits - h64 @ w64.T) <= bound)


@pytest.mark.parametrize("dtype", WORD_DTYPES)
@pytest.mark.parametrize("vocab", [1, 5, 33, 257])
@pytest.mark.parametrize("width", [1, 37, 64, 100, 2560])
def test_word_table_logits_match_numpy(rng, dtype, vocab, width):
    table = Embedding.from_weights(rng.standard_normal((vocab, width)).astype(np.float32), dtype)
    h = rng.standard_normal((3, width)).astype(np.float32)
    assert_logits_close(table.logits(h), h, stored_floats(table))


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("word_format", [F16_WORDS, BF16_WORDS, F32_VALUES])
@pytest.mark.parametrize("vocab, width, tokens", [(1, 1, 2), (3, 40, 1), (6, 64, 3), (9, 2560, 5)])
def test_word_logits_on_every_path(rng, path, word_format, vocab, width, tokens):
    """Each kernel path of ``logits_words`` (odd vocabularies: a group's rows repeated; widths
    with a tail past the vectors) against numpy's widening, in float64."""
    values = rng.standard_normal((vocab, width)).astype(np.float32)
    values[:, ::7] *= 1e-6  # small values too (f16 subnormals)
    if word_format is F32_VALUES:
        words = floats = values
    elif word_format is F16_WORDS:
        words = values.astype(np.float16).view(np.uint16)
        floats = words.view(np.float16).astype(np.float32)
    else:
        words = (values.view(np.uint32) >> 16).astype(np.uint16)
        floats = (words.astype(np.uint32) << 16).view(np.float32)
    h = rng.standard_normal((tokens, width)).astype(np.float32)
    out = np.empty((tokens, vocab), np.float32)
    head_kernels.logits_words(simd.MARKERS[path], word_format, words, h, out)
    assert_logits_close(out, h, floats)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("word_format", [F16_WORDS, BF16_WORDS, F32_VALUES])
@pytest.mark.parametrize("vocab, width", [(7, 100), (13, 2560), (2, 1)])
def test_a_tokens_word_logits_do_not_depend_on_the_tokens_beside_it(rng, path, word_format, vocab, width):
    """One token alone (the row-by-row decode kernel) gets the bits it gets among 6 (groups of 4 rows),
    on every path: batched and single decoding agree exactly."""
    table = rng.standard_normal((vocab, width)).astype(np.float32)
    if word_format is not F32_VALUES:
        table = table.astype(np.float16).view(np.uint16) if word_format is F16_WORDS else \
            (table.view(np.uint32) >> 16).astype(np.uint16)
    h = rng.standard_normal((6, width)).astype(np.float32)
    together = np.empty((6, vocab), np.float32)
    head_kernels.logits_words(simd.MARKERS[path], word_format, table, h, together)
    for t in range(6):
        alone = np.empty((1, vocab), np.float32)
        head_kernels.logits_words(simd.MARKERS[path], word_format, table, h[t : t + 1].copy(), alone)
        assert np.array_equal(alone[0], together[t])


def test_vector_loads_refuse_strided_arrays_at_compile_time():
    """The SIMD loads address flat elements: a strided array is a typing error, never a wrong logit."""
    strided = np.zeros((2, 128), np.float32)[:, ::2]
    with pytest.raises(numba.core.errors.TypingError, match="load_floats|widen_words"):
        head_kernels.logits_words(simd.MARKERS["avx512vnni"], F32_VALUES, np.zeros((3, 64), np.float32), strided,
                                  np.empty((2, 3), np.float32))


@pytest.mark.parametrize("dtype", WORD_DTYPES)
def test_widening_is_exact_for_every_finite_word(dtype):
    """Every finite f16 / bf16 value (subnormals, -0, the largest) widens exactly, in rows and logits."""
    words = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    exponent = 0x7C00 if dtype == "f16" else 0x7F80
    words = words[(words & exponent) != exponent]  # no Inf or NaN: Inf * 0 would be NaN below
    width = 64
    words = words[: len(words) // width * width].reshape(-1, width)
    table = Embedding(words.view(np.float16) if dtype == "f16" else words, dtype)
    expected = stored_floats(table)
    np.testing.assert_array_equal(table.rows(np.arange(table.vocab_size)), expected)
    for j in (0, 17, 63):  # a one-hot h picks column j: one exact product, the rest +0
        h = np.zeros((1, width), np.float32)
        h[0, j] = 1
        np.testing.assert_array_equal(table.logits(h)[0], expected[:, j])


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "int8"])
def test_rows_equal_numpy_exactly(rng, dtype):
    table = Embedding.from_weights(rng.standard_normal((257, 100)).astype(np.float32), dtype)
    ids = np.array([256, 0, 5, 5, 128])
    np.testing.assert_array_equal(table.rows(ids), stored_floats(table)[ids])
    out = np.full((5, 100), np.nan, np.float32)
    assert table.rows(ids, out=out) is out and np.array_equal(out, stored_floats(table)[ids])


@pytest.mark.parametrize("dtype", WORD_DTYPES)
def test_nan_rows_nan_tokens_and_thread_count(dtype):
    """A NaN table row spoils only its logit, a NaN in h only its token; 1 and 2 threads agree bit for bit."""
    rng = np.random.default_rng(11)
    weights = rng.standard_normal((1001, 200)).astype(np.float32)
    weights[500, 3] = np.nan
    table = Embedding.from_weights(weights, dtype)
    h = rng.standard_normal((2, 200)).astype(np.float32)
    threads = bn.get_num_threads()
    try:
        bn.set_num_threads(1)
        one = table.logits(h)
        bn.set_num_threads(max(2, threads))
        np.testing.assert_array_equal(table.logits(h), one)
    finally:
        bn.set_num_threads(threads)
    assert np.isnan(one[:, 500]).all() and not np.isnan(np.delete(one, 500, axis=1)).any()
    assert_logits_close(np.delete(one, 500, axis=1), h, np.delete(stored_floats(table), 500, axis=0))
    h[0, 150] = np.nan
    logits = table.logits(h)
    assert np.isnan(logits[0]).all() and np.array_equal(logits[1], one[1], equal_nan=True)



@intrinsic
def _f16_by_integers(typingctx, word):
    """``simd._f16_bits_widen`` alone: what ``widen_word`` compiles to for an x86 CPU without F16C."""

    def codegen(context, builder, sig, args):
        return simd._f16_bits_widen(builder, args[0])

    return types.float32(word), codegen


@numba.njit
def _widen_by_integers(words, out):
    for i in range(words.shape[0]):
        out[i] = _f16_by_integers(words[i])


def test_integer_f16_widening_matches_numpy_for_every_word():
    """The F16C-less widening (``NUMBA_CPU_NAME=generic`` caches) gives numpy's float32 for all 65536 words."""
    words = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(words.shape, np.float32)
    _widen_by_integers(words, out)
    expected = words.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])  # -0 and subnormals too

@AVX512_ASM
@pytest.mark.parametrize("kernel, word_format, expected", [
    ("logits_words", F16_WORDS, ("vcvtph2ps", r"vfmadd\w+")),
    ("logits_words", BF16_WORDS, ("vpslld", r"vfmadd\w+")),
    ("logits_words", F32_VALUES, (r"vfmadd\w+",)),
    ("rows_words", F16_WORDS, ("vcvtph2ps",)),
    ("rows_words", BF16_WORDS, ("vpslld",)),
    ("rows_int8", None, ("vpmovsxbd", "vcvtdq2ps", "vmulps")),
])
def test_kernels_are_vectorized(kernel, word_format, expected):
    """Each loop widens 16 values per instruction (zmm), and f16 never goes through a libcall per value."""
    table = np.zeros((5, 64), np.uint16)
    ids, rows = np.array([1, 3]), np.empty((2, 64), np.float32)
    args = {
        "logits_words": (simd.MARKERS["avx512vnni"], word_format,
                         table.astype(np.float32) if word_format is F32_VALUES else table,
                         np.zeros((1, 64), np.float32), np.empty((1, 5), np.float32)),
        "rows_words": (word_format, table, ids, rows),
        "rows_int8": (table.astype(np.int8), np.ones(5, np.float32), ids, rows),
    }[kernel]
    asm = fresh_asm(getattr(head_kernels, kernel), *args)
    for instruction in expected:
        assert re.search(rf"\b{instruction}\s[^\n]*%zmm", asm), instruction
    assert not re.search(r"extendhfsf2|h2f_ieee|truncsfhf2", asm)


@AVX512_ASM
def test_the_int8_lanes_head_broadcasts_the_activations():
    """The lanes head multiplies 16 rows per ``vpdpbusd``, the token's 4 activations broadcast from
    memory (``{1to16}``), and scales whole blocks in zmm."""
    vocab, width, n = 32, 64, 13
    lanes = np.zeros(head_kernels.lanes_shape(vocab, width), np.int8)
    asm = fresh_asm(head_kernels.logits_int8_lanes, simd.MARKERS["avx512vnni"], lanes, np.ones(vocab, np.float32),
                    np.ones((n, width), np.float32), np.empty((n, width), np.int8), np.empty((n, 2), np.float32),
                    np.empty((n, 2), np.int32), np.empty((n, vocab), np.float32))
    assert len(re.findall(r"vpdpbusd\s+[^\n]*\{1to16\}, %zmm", asm)) >= 8 + 4 + 1
    assert re.search(r"\bvcvtdq2ps\s[^\n]*%zmm", asm)

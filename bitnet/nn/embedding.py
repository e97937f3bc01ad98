"""The token embedding table, which also serves as the output head when the model ties them."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import numpy as np

from .. import errors
from ..choices import HEAD_DTYPES, HEADS
from ..kernels import head as head_kernels
from ..kernels.simd import BF16_WORDS, F16_WORDS, F32_VALUES, MARKERS
from ..ops import KERNEL_PATH
from . import checks, scratch

_NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16}
_TABLE_DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16, "int8": np.int8}  # as stored
_WORD_FORMATS = {"f16": F16_WORDS, "bf16": BF16_WORDS}  # tables the kernels read as raw uint16 words


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bf16 (nearest even) and return the raw uint16 words."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """Widen raw bf16 words (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def as_float32(values: np.ndarray) -> np.ndarray:
    """Float weights (float16/32/64, or ml_dtypes' bfloat16 as checkpoints hold it) as float32."""
    if values.dtype.name == "bfloat16":
        return bf16_bits_to_float(values.view(np.uint16))
    return values.astype(np.float32, copy=False)


class Embedding:
    """A ``(vocab, hidden)`` table: rows for token lookup, and ``h @ table.T`` for logits.

    Storage (``dtype``): ``"f32"``, ``"f16"``, ``"bf16"`` (raw uint16 words, as checkpoints
    hold it: numpy has no bfloat16) or ``"int8"`` (per-row absmax codes + float32 row
    scales: half the bytes of bf16, so a faster head when decoding is memory bound). An int8
    head also quantizes the hidden state, to int8 in blocks of 32 values with a scale each
    (llama.cpp's ``Q8_0 x Q8_0``), so its logits carry that rounding too (see ``logits``).

    Parameters
    ----------
    table : the stored array, ``(vocab, hidden)``: float32, float16, uint16 bf16 words or int8.
    dtype : which of the storage kinds ``table`` is.
    row_scale : float32 ``(vocab,)``, only for ``"int8"``.
    """

    def __init__(self, table: np.ndarray, dtype: str, row_scale: np.ndarray | None = None) -> None:
        if dtype not in HEAD_DTYPES:
            raise errors.unknown_name("embedding dtype", dtype, HEAD_DTYPES)
        if not isinstance(table, np.ndarray) or table.dtype != _TABLE_DTYPES[dtype]:
            got = table.dtype if isinstance(table, np.ndarray) else type(table).__name__
            raise errors.DTypeError(f"a {dtype!r} embedding table must be a numpy array of "
                                    f"{np.dtype(_TABLE_DTYPES[dtype])}, got {got}; use Embedding.from_weights")
        errors.check_ndim(table, "embedding table", (2,))
        if 0 in table.shape:
            raise errors.ShapeError(f"the embedding table must have rows and columns, got shape {table.shape}")
        if (dtype == "int8") != (row_scale is not None):
            raise errors.InvalidValueError("row_scale is needed by an 'int8' table, and only by one")
        if row_scale is not None:
            if not isinstance(row_scale, np.ndarray) or row_scale.dtype != np.float32:
                raise errors.DTypeError("row_scale must be a float32 numpy array")
            if row_scale.shape != (table.shape[0],):
                raise errors.ShapeError(f"row_scale must have shape ({table.shape[0]},), got {row_scale.shape}")
            row_scale = np.ascontiguousarray(row_scale)
        self._allocate(dtype, table.shape, row_scale, copy=False)
        if self._lanes is None:
            self._table = np.ascontiguousarray(table)
        else:
            self._write_rows(0, table)

    def _allocate(self, dtype: str, shape: tuple[int, int], row_scale: np.ndarray | None, copy: bool = True) -> None:
        """Set the attributes and allocate the storage: an int8 table on the AVX-512 VNNI paths in the
        lanes layout of their head kernel (``bitnet.kernels.head.interleave_int8``), any other table
        as it is (allocated only with ``copy``)."""
        self.dtype = dtype
        self.row_scale = row_scale
        self._shape = tuple(shape)
        lanes = dtype == "int8" and KERNEL_PATH in head_kernels.LANES_PATHS
        self._lanes = np.empty(head_kernels.lanes_shape(*shape), np.int8) if lanes else None
        self._table = np.empty(shape, _TABLE_DTYPES[dtype]) if copy and not lanes else None

    def _write_rows(self, start: int, rows: np.ndarray) -> None:
        """Store ``rows`` (in the stored dtype) from row ``start`` on (a multiple of 16, or the end)."""
        if self._lanes is None:
            self._table[start : start + rows.shape[0]] = rows
        else:
            group = head_kernels.INT8_GROUP
            head_kernels.interleave_int8(np.ascontiguousarray(rows),
                                         self._lanes[start // group : -(-(start + rows.shape[0]) // group)])

    @classmethod
    def int8_from_blocks(cls, blocks: Iterable[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> Embedding:
        """An ``"int8"`` table of ``shape`` from consecutive row blocks ``(codes, row_scale)``: int8
        ``(rows, hidden)`` and float32 ``(rows,)``, each block but the last a multiple of 16 rows.
        Each block goes straight into the storage, so the table never exists twice (random models).

        Raises ShapeError for a shape that is not two integers >= 1, blocks that do not fill it
        exactly or a block of another width; DTypeError for blocks that are not an iterable of
        pairs of arrays, codes that are not int8 or scales that are not float32; OutOfMemoryError
        when the table does not fit in memory.
        """
        try:
            vocab, hidden = (operator.index(d) for d in shape)
        except (TypeError, ValueError):
            vocab = hidden = 0
        if min(vocab, hidden) < 1:
            raise errors.ShapeError(f"an embedding table's shape must be two integers >= 1, got {shape!r:.80}")
        embedding = cls.__new__(cls)
        try:
            row_scale = np.empty(vocab, np.float32)
            embedding._allocate("int8", (vocab, hidden), row_scale)
        except MemoryError:
            raise errors.OutOfMemoryError(f"an int8 table of {vocab} x {hidden} does not fit in memory") from None
        try:
            blocks = iter(blocks)
        except TypeError:
            raise errors.DTypeError(f"blocks must be an iterable of (codes, row_scale) pairs, "
                                    f"got {blocks!r:.80}") from None
        group = head_kernels.INT8_GROUP
        start = 0
        for block in blocks:
            if not (isinstance(block, tuple) and len(block) == 2 and all(isinstance(a, np.ndarray) for a in block)):
                raise errors.DTypeError(f"each block must be a pair (codes, row_scale) of numpy arrays, "
                                        f"got {block!r:.80}")
            codes, scales = block
            errors.check_dtype(codes, "int8 table rows", [np.int8])
            errors.check_dtype(scales, "int8 row scales", [np.float32])
            if (codes.shape[1:] != (hidden,) or scales.shape != codes.shape[:1] or start % group
                    or start + codes.shape[0] > vocab):
                raise errors.ShapeError(f"blocks of int8 rows must be (rows, {hidden}) with one scale a row, every "
                                        f"block but the last a multiple of {group} rows, {vocab} rows in all")
            embedding._write_rows(start, codes)
            row_scale[start : start + codes.shape[0]] = scales
            start += codes.shape[0]
        if start != vocab:
            raise errors.ShapeError(f"the blocks hold {start} rows, the table {vocab}")
        return embedding

    @property
    def table(self) -> np.ndarray:
        """The stored table, ``(vocab, hidden)``. An int8 table kept in the lanes layout (on AVX-512
        VNNI, ``bitnet.kernels.head.interleave_int8``) comes back as a row-major copy made on each
        access: for saving and tests, not for inference."""
        if self._lanes is None:
            return self._table
        table = np.empty(self._shape, np.int8)
        head_kernels.deinterleave_int8(self._lanes, table)
        return table

    @classmethod
    def from_weights(cls, weights: np.ndarray, dtype: str = "auto") -> Embedding:
        """Store float weights (float32/float16, or bfloat16 from ml_dtypes) as ``dtype``.

        ``"auto"`` keeps the checkpoint's own precision (bf16 stays bf16, nothing is widened).
        """
        source = _storage_kind(weights)
        errors.check_ndim(weights, "embedding weights", (2,))
        dtype = source if dtype == "auto" else dtype
        if dtype not in HEAD_DTYPES:
            raise errors.unknown_name("embedding dtype", dtype, HEADS)
        if dtype == source:
            raw = weights.view(np.uint16) if source == "bf16" else weights
            return cls(raw, dtype)
        as_float = _to_float32(weights, source)
        if dtype == "bf16":
            return cls(float_to_bf16_bits(as_float), dtype)
        if dtype == "int8":
            codes, row_scale = int8_rows(as_float)
            return cls(codes, dtype, row_scale)
        return cls(as_float.astype(_NUMPY_DTYPES[dtype]), dtype)

    @property
    def vocab_size(self) -> int:
        return self._shape[0]

    @property
    def hidden_size(self) -> int:
        return self._shape[1]

    @property
    def nbytes(self) -> int:
        stored = self._table if self._lanes is None else self._lanes
        return stored.nbytes + (0 if self.row_scale is None else self.row_scale.nbytes)

    def float_weights(self) -> np.ndarray:
        """The table as float32 (a full-size copy: for saving and tests, not for inference)."""
        return self.rows(np.arange(self.vocab_size))

    def rows(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Float32 rows ``(len(ids), hidden)`` for token ids, written into ``out`` when given.

        Raises InvalidValueError for an id outside ``[0, vocab_size)``, ShapeError or
        DTypeError for ids that are not 1-D integers or an ``out`` of another shape or dtype.
        """
        ids = checks.checked_ids(ids, self.vocab_size)
        out = errors.checked_out(out, (len(ids), self.hidden_size))
        if self.dtype in _WORD_FORMATS:
            head_kernels.rows_words(_WORD_FORMATS[self.dtype], self.table.view(np.uint16), ids, out)
        elif self._lanes is not None:
            head_kernels.rows_int8_lanes(self._lanes, self.row_scale, ids, out)
        elif self.dtype == "int8":
            head_kernels.rows_int8(self._table, self.row_scale, ids, out)
        else:
            np.take(self.table, ids, axis=0, out=out)
        return out

    def logits(self, h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``h @ table.T`` for ``h`` of shape ``(n, hidden)`` float32 -> ``(n, vocab)`` float32.

        With int8 storage ``h`` is rounded to int8 first, per block of 32 values
        (``bitnet.kernels.head.logits_int8``): each value moves by at most 1/254 of its block's
        largest magnitude, on top of the table's own rounding.
        """
        checks.check_rows(h, "hidden states", self.hidden_size)
        out = errors.checked_out(out, (h.shape[0], self.vocab_size))
        h = np.ascontiguousarray(h)  # the kernels load it by flat index
        if self.dtype == "f32":
            head_kernels.logits_words(MARKERS[KERNEL_PATH], F32_VALUES, self.table, h, out)
        elif self.dtype in _WORD_FORMATS:
            head_kernels.logits_words(MARKERS[KERNEL_PATH], _WORD_FORMATS[self.dtype], self.table.view(np.uint16), h,
                                      out)
        elif self._lanes is not None:
            tokens, padded = head_kernels.padded_tokens(h.shape[0]), self._lanes.shape[1] // head_kernels.INT8_GROUP
            q = scratch.empty((tokens, padded), np.int8)
            block_scale = scratch.empty((tokens, padded // head_kernels.INT8_BLOCK), np.float32)
            offsets = scratch.empty((tokens, padded // head_kernels.INT8_BLOCK), np.int32)
            head_kernels.logits_int8_lanes(MARKERS[KERNEL_PATH], self._lanes, self.row_scale, h, q, block_scale,
                                           offsets, out)
        else:
            n, width = h.shape
            q = scratch.empty((n, width), np.int8)
            block_scale = scratch.empty((n, -(-width // head_kernels.INT8_BLOCK)), np.float32)
            head_kernels.logits_int8(MARKERS[KERNEL_PATH], self._table, self.row_scale, h, q, block_scale, out)
        return out


def int8_rows(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 rows as an int8 table stores them: per-row absmax codes and their float32 scales."""
    absmax = np.maximum(np.abs(weights).max(axis=1), np.float32(1e-12))
    row_scale = (absmax / np.float32(127)).astype(np.float32)
    return np.rint(weights / row_scale[:, None]).astype(np.int8), row_scale


def _storage_kind(weights: np.ndarray) -> str:
    if not isinstance(weights, np.ndarray):
        raise errors.DTypeError(f"embedding weights must be a numpy array, got {type(weights).__name__}")
    if weights.dtype == np.float32:
        return "f32"
    if weights.dtype == np.float16:
        return "f16"
    if weights.dtype.name == "bfloat16":
        return "bf16"
    raise errors.DTypeError(f"embedding weights must be float32, float16 or bfloat16, got {weights.dtype}")


def _to_float32(weights: np.ndarray, kind: str) -> np.ndarray:
    if kind == "bf16":
        return bf16_bits_to_float(weights.view(np.uint16))
    return weights.astype(np.float32)

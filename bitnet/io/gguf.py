"""Read and write GGUF model files: llama.cpp's and bitnet.cpp's ternary models.

The file structure and metadata are read and written by the ``gguf`` package (maintained
with llama.cpp); this module maps them to :class:`BitNetForCausalLM` and decodes the tensor
payloads with ``bitnet.formats``:

* ternary projections in TQ2_0 (type 35), TQ1_0 (type 34) or bitnet.cpp's I2_S (type 36),
  or as float weights (F32, F16, BF16), used from the memory map and converted once into
  the kernels' layout;
* norms as F32/F16/BF16; the embedding (and an untied ``output.weight``) as F32, F16,
  BF16 or any type ``gguf.quants.dequantize`` knows (Q8_0, Q6_K, Q4_0, ...).

Tensor names follow llama.cpp (``blk.N.attn_q.weight``, ``{arch}.block_count``, ...); the
architecture name says which network a file holds (``bitnet.io.gguf_arch``: ``bitnet``,
``bitnet-b1.58``, ``bitnet-25``, ``llama``). The BitNet graphs use the "rotate half" (NeoX)
rope, as HF does, so q/k rows are stored unpermuted.

I2_S is bitnet.cpp's own type id, unknown to ``gguf.GGMLQuantizationType``: the reader
below is ``gguf.GGUFReader`` with its tensor-table step replaced, and the writer is handed
I2_S payloads as opaque bytes with their element shape.

Every failure to read a file (corrupt, truncated, unsupported) raises :class:`GGUFError`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import errors
from ..choices import GGUF_WEIGHT_FORMATS, HEADS
from ..formats import PackedTernary, pack, unpack
from ..formats import i2_s as i2_s_format
from ..models import BitNetConfig, BitNetForCausalLM
from ..nn import BitLinear
from ..nn.embedding import as_float32, bf16_bits_to_float
from ..nn.rope import checked_freq_factors, llama3_freq_factors
from ..quant import TernaryTensor, quantize_weights
from . import atomic, gguf_arch, gguf_tokenizer
from .progress import Progress, ReportingDict

if TYPE_CHECKING:
    from tokenizers import Tokenizer


I2_S_TYPE = 36  # GGML_TYPE_I2_S in bitnet.cpp's ggml fork
# ggml type id -> bitnet.formats name of the ternary payload types.
TERNARY_TYPES = {34: "tq1_0", 35: "tq2_0", I2_S_TYPE: "i2_s"}
FLOAT_TYPES = (0, 1, 30)  # F32, F16, BF16
MOSTLY_I2_S = 40  # its LLAMA_FTYPE_MOSTLY_I2_S
DEFAULT_ROPE_THETA = 10000.0  # llama.cpp's value when rope.freq_base is absent
DEFAULT_CONTEXT = 4096
TQ_BLOCK = 256

# Decoder-layer tensors: HF module name -> llama.cpp name (both without ".weight").
PROJECTIONS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency rope divisors (Llama 3 scaling); all 1 for plain rope


def rope_row_order(rows: int, heads: int) -> np.ndarray:
    """Row ``i`` of a llama-architecture GGUF q/k projection is HF row ``order[i]``.

    llama.cpp's converter permutes the rows of every Llama's q and k so that its interleaved
    rope (pairs ``2i, 2i + 1``) computes HF's rotate-half rope (pairs ``i, i + d/2``).
    """
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _reordered(linear: BitLinear, order: np.ndarray) -> BitLinear:
    """``linear`` with its output rows (codes, per-channel scales, bias) taken in ``order``."""
    t = unpack(linear.weight)
    scale = t.scale[order] if t.granularity == "channel" else t.scale
    weight = pack(TernaryTensor(np.ascontiguousarray(t.codes[order]), scale, t.granularity, t.group_size), "i2")
    return BitLinear(weight, None if linear.bias is None else linear.bias[order], linear.input_norm)


def _permuted_rope_rows(config: BitNetConfig) -> dict[str, int]:
    """Projections stored with permuted rows in this family's GGUF files: HF name -> its head count."""
    if gguf_arch.architecture_for(config) != "llama":
        return {}
    return {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}


def layer_norms(config: BitNetConfig) -> dict[str, str]:
    """The decoder layer's norms: HF module name -> llama.cpp name (sub-norms only in the BitNet families)."""
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    if config.sub_norms:
        names.update(zip(config.sub_norm_names, gguf_arch.SUB_NORM_TENSORS, strict=True))
    return names

# GGUFValueType ids (fixed by the file format): the integer kinds, the float kinds, and others.
_INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)  # UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64
_FLOAT_TYPES = (6, 12)  # FLOAT32, FLOAT64
_INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 5, 6, 7, 8, 9
TQ_BLOCK_BYTES = {"tq2_0": 66, "tq1_0": 54}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise errors.GGUFError(
            'reading and writing GGUF files needs the gguf package: pip install "bitnet-numba[gguf]"'
        ) from None
    return gguf


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file.

    Attributes
    ----------
    name : its GGUF name (``blk.0.attn_q.weight``).
    type_id : its ggml type id (0 F32, 1 F16, 30 BF16, 34 TQ1_0, 35 TQ2_0, 36 I2_S, ...).
    shape : the element shape, rows first (the reverse of GGUF's ``ne`` list).
    data : its payload, uint8, a view of the file's memory map.
    """

    name: str
    type_id: int
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def type_name(self) -> str:
        if self.type_id == I2_S_TYPE:
            return "I2_S"
        return _gguf().GGMLQuantizationType(self.type_id).name


def payload_nbytes(type_id: int, shape: tuple[int, ...]) -> int:
    """Bytes of a ``type_id`` tensor of element ``shape``; GGUFError for a type or shape ggml cannot hold."""
    gguf = _gguf()
    count = math.prod(shape)
    if type_id == I2_S_TYPE:
        return i2_s_format.packed_shape((1, count))[0]
    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise errors.GGUFError(f"unknown ggml tensor type id {type_id}") from None
    if shape and shape[-1] % block:
        raise errors.GGUFError(f"a row of {shape[-1]} elements is not a whole number of {block}-element blocks")
    return count // block * size


@functools.cache
def _reader_class():
    """``gguf.GGUFReader`` hardened for untrusted files, and taught bitnet.cpp's I2_S type.

    Three internals of the package's reader are replaced (the class is built on first use,
    so that importing this module does not need ``gguf``):

    * ``data``, the file's mapping, is kept as a plain ndarray rather than a ``np.memmap``,
      whose slicing costs several times more (the header is read in many small slices);
    * ``_get`` refuses reads past the end of the file: the package would return a short
      array, and an array length read from a corrupt file could then loop for a very long time;
    * ``_build_tensors`` accepts type id 36 (I2_S), which ``gguf.GGMLQuantizationType``
      lacks, checks each payload lies inside the file at an aligned offset, and keeps the
      tensors as :class:`GGUFTensor` records.
    """
    gguf = _gguf()

    class Reader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._mapped

        @data.setter
        def data(self, mapped: np.ndarray) -> None:
            self._mapped = mapped.view(np.ndarray)

        def _get(self, offset, dtype, count=1, override_order=None):
            values = super()._get(offset, dtype, count, override_order)
            if len(values) != count:
                raise errors.GGUFError(f"its header reads past the end of the file ({len(self.data)} bytes): "
                                       f"a length or count in it is corrupt, or the file is truncated")
            return values

        def _build_tensors(self, start_offs, fields):
            self.tensors = [self._tensor(start_offs, field) for field in fields]

        def _tensor(self, start, field) -> GGUFTensor:
            _, name_bytes, _, dims, raw_type, offset = field.parts
            name = bytes(name_bytes).decode("utf-8")
            shape = tuple(int(d) for d in reversed(dims.tolist()))
            if len(shape) > 4:
                raise errors.GGUFError(f"tensor {name!r} has {len(shape)} dimensions; ggml allows 4")
            nbytes = payload_nbytes(int(raw_type[0]), shape)
            relative = int(offset[0])
            if relative % self.alignment:
                raise errors.GGUFError(f"tensor {name!r} starts at offset {relative}, "
                                       f"not a multiple of the file's alignment {self.alignment}")
            begin = start + relative
            if begin + nbytes > len(self.data):
                raise errors.GGUFError(f"tensor {name!r} ({nbytes} bytes at byte {begin}) runs past the end "
                                       f"of the file ({len(self.data)} bytes): the file is truncated")
            return GGUFTensor(name, int(raw_type[0]), shape, self.data[begin:begin + nbytes])

    return Reader


class GGUFFile:
    """An open GGUF file: its metadata (``fields``) and tensors by name, read through ``gguf``.

    Parameters
    ----------
    path : the ``.gguf`` file.

    Raises
    ------
    CheckpointNotFoundError when the file does not exist; GGUFError when it is not a
    readable little-endian GGUF file (bad magic, truncated, corrupt header or tensor table).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise errors.CheckpointNotFoundError(f"GGUF file {self.path} does not exist")
        try:
            reader = _reader_class()(self.path)
        except errors.BitNetError as exc:
            raise self.error(str(exc)) from None
        except Exception as exc:  # the gguf reader raises ValueError, KeyError, IndexError, ... on bad input
            raise self.error(f"not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        if reader.byte_order != "I":
            raise self.error("the file is big-endian; only little-endian GGUF files are supported")
        self.fields = reader.fields
        self.data_offset: int = reader.data_offset  # where the tensor payloads begin
        self.tensors: dict[str, GGUFTensor] = {}
        for tensor in reader.tensors:
            if tensor.name in self.tensors:
                raise self.error(f"tensor {tensor.name!r} appears twice")
            self.tensors[tensor.name] = tensor

    def error(self, message: str) -> errors.GGUFError:
        """A GGUFError naming this file, with the advice every corrupt file gets."""
        return errors.GGUFError(
            f"{self.path}: {message}. If the file is truncated or corrupt, download or convert it again"
        )

    def value(self, key: str, kinds: tuple[int, ...], default: Any = ...) -> Any:
        """The scalar metadata value ``key`` of one of the GGUFValueType ids ``kinds``; ``default`` when absent."""
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise self.error(f"metadata key {key!r} is missing")
            return default
        if len(field.types) != 1 or field.types[0] not in kinds:
            raise self.error(f"metadata key {key!r} has the wrong type")
        return self._contents(key, field)

    def array(self, key: str, kind: int) -> list | None:
        """The array metadata value ``key`` whose items have GGUFValueType id ``kind``; None when absent."""
        field = self.fields.get(key)
        if field is None:
            return None
        if field.types[0] != _ARRAY or (len(field.types) > 1 and field.types[1:] != [kind]):
            raise self.error(f"metadata key {key!r} is not an array of the expected type")
        return self._contents(key, field)

    def _contents(self, key: str, field) -> Any:
        try:
            return field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as exc:
            raise self.error(f"metadata key {key!r} is unreadable ({exc})") from None


def _size(file: GGUFFile, key: str, default: Any = ...) -> int:
    value = file.value(key, _INT_TYPES, default)
    if not isinstance(value, int) or value < 1:
        raise file.error(f"metadata key {key!r} must be a positive integer, got {value!r}")
    return value


def _positive_float(file: GGUFFile, key: str, default: Any = ...) -> float:
    """A positive metadata number the float32 model math can use (a normal float32, not 0 after rounding)."""
    value = float(file.value(key, _FLOAT_TYPES, default))
    limits = np.finfo(np.float32)
    if not limits.tiny <= value <= limits.max:
        raise file.error(f"metadata key {key!r} must be a positive normal float32 number, got {value!r}")
    return value


def _token_id(file: GGUFFile, key: str, vocab_size: int) -> int | None:
    value = file.value(key, _INT_TYPES, None)
    if value is not None and not 0 <= value < vocab_size:
        raise file.error(f"{key}={value} is not a token id (the vocabulary has {vocab_size})")
    return value


def read_config(file: GGUFFile) -> BitNetConfig:
    """The :class:`BitNetConfig` of a GGUF file's ``{arch}.*`` metadata and its embedding shape."""
    arch = file.value("general.architecture", (_STRING,))
    ternary = any(t.type_id in TERNARY_TYPES for name, t in file.tensors.items() if name.startswith("blk."))
    try:
        network = gguf_arch.network_of(arch, set(file.tensors), ternary)
    except errors.GGUFError as exc:
        raise file.error(str(exc)) from None
    hidden = _size(file, f"{arch}.embedding_length")
    heads = _size(file, f"{arch}.attention.head_count")
    kv_heads = _size(file, f"{arch}.attention.head_count_kv", heads)
    if heads % kv_heads:
        raise file.error(f"{heads} attention heads cannot be shared by {kv_heads} key/value heads")
    if f"{arch}.rope.dimension_count" not in file.fields and hidden % heads:
        raise file.error(f"embedding_length {hidden} is not a multiple of head_count {heads}")
    head_dim = _size(file, f"{arch}.rope.dimension_count", hidden // heads)
    for key in (f"{arch}.attention.key_length", f"{arch}.attention.value_length"):
        if _size(file, key, head_dim) != head_dim:
            raise file.error(f"{key} differs from the rotary dimension {head_dim}: partial rope is not supported")
    if head_dim % 2:
        raise file.error(f"the head dimension {head_dim} must be even for rotary embeddings")
    embedding = file.tensors.get("token_embd.weight")
    if embedding is None or len(embedding.shape) != 2:
        raise file.error("tensor 'token_embd.weight' is missing or not 2-D")
    vocab_size = embedding.shape[0]
    if _size(file, f"{arch}.vocab_size", vocab_size) != vocab_size:
        raise file.error(f"{arch}.vocab_size disagrees with the {vocab_size} rows of token_embd.weight")
    return BitNetConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=_size(file, f"{arch}.feed_forward_length"),
        num_hidden_layers=_size(file, f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive_float(file, f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=_positive_float(file, f"{arch}.rope.freq_base", DEFAULT_ROPE_THETA),
        max_position_embeddings=_size(file, f"{arch}.context_length", DEFAULT_CONTEXT),
        tie_word_embeddings="output.weight" not in file.tensors,
        bos_token_id=_token_id(file, gguf_tokenizer.BOS_KEY, vocab_size),
        eos_token_id=_token_id(file, gguf_tokenizer.EOS_KEY, vocab_size),
        model_type=network.model_type,
        hidden_act=network.hidden_act,
        sub_norms=network.sub_norms,
        rope_scaling=_rope_scaling(file, arch, head_dim),
    )


def _rope_scaling(file: GGUFFile, arch: str, head_dim: int) -> dict[str, Any] | None:
    """HF-style rope parameters of the file: linear scaling, or llama.cpp's ``rope_freqs`` divisors."""
    kind = file.value(f"{arch}.rope.scaling.type", (_STRING,), "none")
    factor = float(file.value(f"{arch}.rope.scaling.factor", _FLOAT_TYPES, 1.0))
    freqs = file.tensors.get(ROPE_FREQS)
    factors = None if freqs is None else _as_float32(file, freqs)
    if factors is not None and np.all(factors == 1):
        factors = None  # llama.cpp's converter writes all-ones divisors for a plain rope
    if kind not in ("none", "linear") or not (math.isfinite(factor) and factor > 0):
        raise file.error(f"rope scaling {kind!r} (factor {factor}) is not supported: only linear scaling and "
                         f"{ROPE_FREQS} are")
    # bitnet.cpp's converter writes "linear" scaling by 1.0, which is no scaling at all.
    linear = kind == "linear" and factor != 1.0
    if linear and factors is not None:
        raise file.error(f"the file has both linear rope scaling and {ROPE_FREQS}; only one is supported")
    if linear:
        return {"rope_type": "linear", "factor": factor}
    if factors is None:
        return None
    try:
        checked_freq_factors(factors, head_dim // 2)
    except errors.ConfigError as exc:
        raise file.error(f"{ROPE_FREQS}: {exc}") from None
    return {"rope_type": "freq_factors", "freq_factors": factors.tolist()}


def _tensor(file: GGUFFile, name: str, shape: tuple[int, ...]) -> GGUFTensor:
    tensor = file.tensors.get(name)
    if tensor is None:
        raise file.error(f"tensor {name!r} is missing")
    if tensor.shape != shape:
        raise file.error(f"tensor {name!r} has shape {tensor.shape} but the metadata implies {shape}")
    return tensor


def _float_array(file: GGUFFile, tensor: GGUFTensor) -> np.ndarray:
    """A float tensor as an array of its own precision (a view of the file where possible)."""
    types = _gguf().GGMLQuantizationType
    kind = tensor.type_id
    if kind == types.F32 or kind == types.F16:
        values = tensor.data.view(np.float32 if kind == types.F32 else np.float16)
        finite = _all_finite(values, np.isfinite)
    elif kind == types.BF16:
        bits = tensor.data.view(np.uint16)
        finite = _all_finite(bits, lambda b: (b & 0x7F80) != 0x7F80)  # an all-ones exponent is Inf or NaN
        values = _bf16(bits)
    elif kind in TERNARY_TYPES:
        raise file.error(f"tensor {tensor.name!r} has the ternary type {tensor.type_name}; float weights were expected")
    else:
        values = _dequantize(file, tensor)
        finite = _all_finite(values, np.isfinite)
    if not finite:
        raise file.error(f"tensor {tensor.name!r} holds NaN or Inf values")
    return values.reshape(tensor.shape)


def _all_finite(values: np.ndarray, is_finite, chunk: int = 1 << 22) -> bool:
    """``is_finite(values).all()``, a chunk at a time: an embedding table is hundreds of MB."""
    flat = values.reshape(-1)
    return all(is_finite(flat[start:start + chunk]).all() for start in range(0, flat.size, chunk))


def _bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 words as ml_dtypes' bfloat16 (which the embedding keeps as is), else widened to float32."""
    try:
        import ml_dtypes
    except ImportError:
        return bf16_bits_to_float(bits)
    return bits.view(ml_dtypes.bfloat16)


def _dequantize(file: GGUFFile, tensor: GGUFTensor) -> np.ndarray:
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType(tensor.type_id)
    try:
        byte_shape = gguf.quant_shape_to_byte_shape(tensor.shape, qtype)
        # Corrupt block scales overflow to Inf/NaN, which the caller reports as an error.
        with np.errstate(over="ignore", invalid="ignore"):
            return gguf.quants.dequantize(tensor.data.reshape(byte_shape), qtype).astype(np.float32)
    except NotImplementedError:
        raise file.error(f"tensor {tensor.name!r} has type {qtype.name}, which gguf.quants cannot dequantize") from None


def _as_float32(file: GGUFFile, tensor: GGUFTensor) -> np.ndarray:
    return as_float32(_float_array(file, tensor))


@functools.cache
def _zero_block(format: str) -> np.ndarray:
    """The code bytes (without ``d``) of a TQ block whose 256 weights are all 0."""
    zeros = TernaryTensor(np.zeros((1, TQ_BLOCK), np.int8), np.float32(1.0).reshape(()))
    return pack(zeros, format).data[0, :-2]


def _tq_scale(data: np.ndarray, format: str, rows: int) -> tuple[np.ndarray, str]:
    """The scale of a TQ payload from its block ``d`` values, as coarse as they allow.

    Real BitNet files give every block that holds weights the tensor scale; blocks of zeros
    (written with ``d = 0``) do not count. Otherwise one scale per row, else per block.
    """
    blocks = data.reshape(rows, -1, TQ_BLOCK_BYTES[format])
    d = np.ascontiguousarray(blocks[..., -2:]).view(np.float16)[..., 0].astype(np.float32)
    if not np.isfinite(d).all() or (d < 0).any():
        raise errors.FormatError("its block scales hold negative, NaN or Inf values")
    holds_weights = ~(blocks[..., :-2] == _zero_block(format)).all(axis=-1)
    used = d[holds_weights]
    if used.size == 0 or (used == used[0]).all():
        return np.float32(used[0] if used.size else 0.0).reshape(()), "tensor"
    highest = np.where(holds_weights, d, -np.inf).max(axis=1)
    lowest = np.where(holds_weights, d, np.inf).min(axis=1)
    if ((highest == lowest) | ~holds_weights.any(axis=1)).all():
        return np.where(np.isfinite(highest), highest, 0).astype(np.float32).reshape(rows, 1), "channel"
    return d, "group"


def read_ternary(tensor: GGUFTensor) -> PackedTernary:
    """The ternary weights of a TQ2_0, TQ1_0 or I2_S tensor, over the file's bytes (no copy).

    TQ block scales become one tensor scale when every block holding weights has the same
    ``d`` (as in every real BitNet file), else per-row or per-block (group of 256) scales.

    Raises
    ------
    FormatError for another type, or a payload with negative or non-finite scales.
    """
    rows, cols = tensor.shape
    format = TERNARY_TYPES.get(tensor.type_id)
    if format is None:
        raise errors.FormatError(f"type {tensor.type_name} is not a ternary type")
    if format == "i2_s":
        scale = i2_s_format.stored_scale(tensor.data)
        if not np.isfinite(scale) or scale < 0:
            raise errors.FormatError(f"its I2_S scale is {scale}")
        return PackedTernary("i2_s", (rows, cols), tensor.data, np.float32(scale).reshape(()))
    data = tensor.data.reshape(rows, -1)
    scale, granularity = _tq_scale(data, format, rows)
    group_size = TQ_BLOCK if granularity == "group" else None
    return PackedTernary(format, (rows, cols), data, scale, granularity, group_size)


def _ternary_from_float(values: np.ndarray) -> TernaryTensor:
    """Float weights as ternary: exact when they only hold 0 and one magnitude ``s`` (converters
    write ``codes * s``), otherwise quantized with absmean as HF's BitLinear does."""
    magnitudes = np.abs(values)
    nonzero = magnitudes[magnitudes > 0]
    if nonzero.size == 0 or (nonzero == nonzero[0]).all():
        scale = np.float32(nonzero[0] if nonzero.size else 0.0).reshape(())
        return TernaryTensor(np.sign(values).astype(np.int8), scale)
    return quantize_weights(values)


def _read_linear(file: GGUFFile, name: str, shape: tuple[int, int]) -> BitLinear:
    """The projection ``name`` (``blk.0.attn_q``) with its optional ``.scale`` and ``.bias`` tensors."""
    tensor = _tensor(file, f"{name}.weight", shape)
    try:
        if tensor.type_id in TERNARY_TYPES:
            weight = read_ternary(tensor)
        elif tensor.type_id in FLOAT_TYPES:
            weight = pack(_ternary_from_float(_as_float32(file, tensor)), "i2")
        else:
            # Other ids include bitnet.cpp's kernel-specific TL1/TL2, whose numbers upstream
            # ggml has since given to other types: refuse rather than misread them.
            raise errors.FormatError("a projection must be TQ1_0, TQ2_0, I2_S, F32, F16 or BF16 "
                                     "(bitnet.cpp's TL1/TL2 files cannot be read: use its i2_s file)")
        if weight.granularity == "group":
            raise errors.FormatError("its TQ block scales differ within rows, and the kernels hold one scale per row")
        if f"{name}.scale" in file.tensors:
            weight = _rescaled(weight, _output_scale(file, f"{name}.scale"))
        bias = None
        if f"{name}.bias" in file.tensors:
            bias = _as_float32(file, _tensor(file, f"{name}.bias", (shape[0],)))
        return BitLinear(weight, bias)
    except errors.GGUFError:
        raise
    except errors.BitNetError as exc:
        raise file.error(f"tensor {name}.weight ({tensor.type_name}) is unusable: {exc}") from None


def _output_scale(file: GGUFFile, name: str) -> np.float32:
    """llama.cpp's optional per-projection output multiplier (``blk.N.attn_q.scale``, one float).

    A factor of 0 or below gives the projection such a scale, which ``BitNetForCausalLM.from_weights``
    refuses along with every other loader's bad scales.
    """
    tensor = file.tensors[name]
    if math.prod(tensor.shape) != 1:
        raise file.error(f"tensor {name!r} must hold one value, got shape {tensor.shape}")
    return np.float32(_as_float32(file, tensor).reshape(-1)[0])


def _rescaled(weight: PackedTernary, factor: np.float32) -> PackedTernary:
    t = unpack(weight)
    return pack(TernaryTensor(t.codes, (t.scale * factor).astype(np.float32), t.granularity, t.group_size), "i2")


def _read_norm(file: GGUFFile, name: str, size: int) -> np.ndarray:
    return _as_float32(file, _tensor(file, name, (size,)))


def _read_weights(file: GGUFFile, config: BitNetConfig, progress: Progress | None = None) -> dict[str, object]:
    """HF-named weights (as :meth:`BitNetForCausalLM.from_weights` takes them) from the GGUF tensors."""
    c = config
    weights = ReportingDict(c.weight_count(), progress)
    used = {ROPE_FREQS}
    shapes = c.linear_shapes()
    norm_sizes = c.norm_shapes()
    permuted = _permuted_rope_rows(c)
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in PROJECTIONS.items():
            name = f"blk.{i}.{gguf_name}"
            linear = _read_linear(file, name, shapes[hf_name])
            if hf_name in permuted:
                linear = _reordered(linear, np.argsort(rope_row_order(shapes[hf_name][0], permuted[hf_name])))
            weights[f"model.layers.{i}.{hf_name}"] = linear
            used.update(f"{name}.{part}" for part in ("weight", "scale", "bias"))
        for hf_name, gguf_name in layer_norms(c).items():
            name = f"blk.{i}.{gguf_name}.weight"
            weights[f"model.layers.{i}.{hf_name}.weight"] = _read_norm(file, name, norm_sizes[hf_name])
            used.add(name)
    weights["model.norm.weight"] = _read_norm(file, "output_norm.weight", c.hidden_size)
    table_shape = (c.vocab_size, c.hidden_size)
    weights["model.embed_tokens.weight"] = _float_array(file, _tensor(file, "token_embd.weight", table_shape))
    if not c.tie_word_embeddings:
        weights["lm_head.weight"] = _float_array(file, _tensor(file, "output.weight", table_shape))
    used.update(("output_norm.weight", "token_embd.weight", "output.weight"))
    # A tensor nobody reads means the metadata (e.g. block_count) disagrees with the file.
    unused = sorted(set(file.tensors) - used)
    if unused:
        raise file.error(f"tensor {unused[0]!r} (and {len(unused) - 1} more) is not part of a "
                         f"{c.num_hidden_layers}-layer {c.default_architecture()} model: the metadata and tensors "
                         f"disagree")
    return weights


def load_gguf(path: str | Path, head_dtype: str = "auto", progress: Progress | None = None) -> BitNetForCausalLM:
    """Load a BitNet b1.58 GGUF file (llama.cpp ``bitnet`` or bitnet.cpp ``bitnet-b1.58``).

    Parameters
    ----------
    path : the ``.gguf`` file, e.g. bitnet.cpp's ``ggml-model-i2_s.gguf`` or a llama.cpp
        TQ1_0/TQ2_0 conversion.
    head_dtype : storage of the embedding / output head: "auto" (the file's precision;
        quantized tables are dequantized to float32), "f32", "f16", "bf16" or "int8".
    progress : called as ``progress(done, total)`` after each weight is read.

    Returns
    -------
    BitNetForCausalLM, the same class :func:`bitnet.load_pretrained` returns. Ternary
    payloads are read from the memory-mapped file and converted once into the kernel layout.

    Raises
    ------
    CheckpointNotFoundError when the file does not exist; GGUFError when it is truncated,
    corrupt, of another architecture, or holds a tensor type or option this library lacks.

    Examples
    --------
    >>> import bitnet as bn                                     # doctest: +SKIP
    >>> model = bn.load_gguf("ggml-model-i2_s.gguf")            # doctest: +SKIP
    >>> tokenizer = bn.load_gguf_tokenizer("ggml-model-i2_s.gguf")  # doctest: +SKIP
    """
    if head_dtype not in HEADS:
        raise errors.unknown_name("head_dtype", head_dtype, HEADS)
    file = GGUFFile(path)
    config = read_config(file)
    return BitNetForCausalLM.from_weights(config, _read_weights(file, config, progress), head_dtype)


def load_gguf_tokenizer(path: str | Path) -> Tokenizer | None:
    """The ``tokenizers.Tokenizer`` described by a GGUF file's ``tokenizer.ggml.*`` metadata.

    Returns None when the file holds no tokenizer. Byte-level BPE (``tokenizer.ggml.model``
    "gpt2", pre-tokenizers "llama-bpe" and "gpt-2") and SentencePiece BPE with byte fallback
    ("llama": Llama 2, 1bitLLM) are supported.

    Raises
    ------
    GGUFError for an unreadable file, another tokenizer kind or inconsistent vocabulary data.
    """
    file = GGUFFile(path)
    model = file.value(gguf_tokenizer.MODEL_KEY, (_STRING,), None)
    if model is None:
        return None
    tokens = file.array(gguf_tokenizer.TOKENS_KEY, _STRING)
    if not tokens:
        raise file.error(f"{gguf_tokenizer.TOKENS_KEY} is missing or empty")
    types = file.array(gguf_tokenizer.TYPES_KEY, _INT32)
    try:
        return gguf_tokenizer.build_tokenizer(
            model,
            file.value(gguf_tokenizer.PRE_KEY, (_STRING,), None),
            tokens,
            types,
            file.array(gguf_tokenizer.MERGES_KEY, _STRING) or [],
            _token_id(file, gguf_tokenizer.BOS_KEY, len(tokens)),
            file.value(gguf_tokenizer.ADD_BOS_KEY, (_BOOL,), None),
            scores=file.array(gguf_tokenizer.SCORES_KEY, _FLOAT32),
            unk_token_id=_token_id(file, gguf_tokenizer.UNK_KEY, len(tokens)),
            add_space_prefix=file.value(gguf_tokenizer.ADD_SPACE_PREFIX_KEY, (_BOOL,), None),
        )
    except errors.GGUFError as exc:
        raise file.error(str(exc)) from None


# ---------------------------------------------------------------------------------------
# Writing


@functools.cache
def _writer_class():
    """``gguf.GGUFWriter`` that also writes empty arrays.

    gguf's own writer drops an empty array (``add_array``) or refuses it (``_pack_val``), but
    llama.cpp refuses a BPE vocabulary whose ``merges`` key is missing, even when it has none.
    """
    gguf = _gguf()
    array = gguf.GGUFValueType.ARRAY

    class Writer(gguf.GGUFWriter):
        def add_list(self, key: str, values, item_type) -> None:
            self.add_key_value(key, list(values), array, sub_type=item_type)

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == array and len(val) == 0:
                return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def save_gguf(
    model: BitNetForCausalLM, path: str | Path, weight_format: str = "tq2_0", tokenizer: Tokenizer | None = None
) -> None:
    """Write ``model`` as a GGUF file under the architecture name that means its network.

    The name comes from :func:`bitnet.io.gguf_arch.architecture_for`: ``bitnet-b1.58``
    (BitNet b1.58 2B4T, relu2: bitnet.cpp), ``bitnet`` (1bitLLM, SiLU with sub-norms:
    llama.cpp and bitnet.cpp) or ``llama`` (Llama-architecture ternary).

    Parameters
    ----------
    model : the model to write.
    path : the ``.gguf`` file to create.
    weight_format : type of the ternary projections: "tq2_0" (2.06 bits/weight) or "tq1_0"
        (1.69), read by llama.cpp, or "i2_s" (2 bits + one float32 per tensor), bitnet.cpp's
        type 36. TQ types need ``in_features`` to be a multiple of 256 and keep one fp16
        scale per block, so a scale that fp16 cannot hold exactly is rounded (relative
        error below 2**-11); i2_s keeps the float32 scale exactly but only one per tensor.
    tokenizer : optional byte-level BPE ``tokenizers.Tokenizer`` to store as ``tokenizer.ggml.*``.

    Notes
    -----
    The BitNet graphs tie the output head to ``token_embd`` and have no projection biases:
    an untied head (``output.weight``) or biases (``blk.N.*.bias``) are written so that
    :func:`load_gguf` gives the same model back, but the engines will not load such a file.

    The file is written beside ``path`` and renamed over it once complete: a failure
    (a refused tensor, a full disk) leaves an existing ``path`` as it was.

    Raises
    ------
    GGUFError when the model cannot be written in ``weight_format`` (shape, scale
    granularity), or has what GGUF files do not hold: BitLinear input norms; a Llama 3 rope
    outside the ``llama`` architecture (only llama.cpp's Llama graph reads ``rope_freqs``).
    """
    if weight_format not in GGUF_WEIGHT_FORMATS:
        raise errors.unknown_name("GGUF weight format", weight_format, GGUF_WEIGHT_FORMATS, errors.GGUFError)
    _check_token_ids(model.config)
    architecture = gguf_arch.architecture_for(model.config)
    with atomic.replacing(path) as (temporary,):
        writer = _writer_class()(str(temporary), architecture)
        try:
            _write_metadata(writer, model.config, weight_format)
            if tokenizer is not None:
                _write_tokenizer(writer, tokenizer, model.config)
            for name, array, raw in _tensors(model, weight_format):
                if raw is None:
                    writer.add_tensor(name, array)
                else:
                    raw_type, shape = raw
                    writer.add_tensor(name, array, raw_shape=shape, raw_dtype=raw_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def _check_token_ids(config: BitNetConfig) -> None:
    """Refuse BOS/EOS ids outside the vocabulary: every GGUF reader (ours included) refuses such a file."""
    named = [("bos_token_id", config.bos_token_id)] + [("eos_token_id", token) for token in config.stop_token_ids]
    for name, token in named:
        if token is not None and not 0 <= token < config.vocab_size:
            raise errors.GGUFError(
                f"{name} {token} is not a token id of the {config.vocab_size}-token vocabulary, and GGUF readers "
                f"refuse such a file: set config.{name} to an id below {config.vocab_size}, or None"
            )


def _write_metadata(writer, config: BitNetConfig, weight_format: str) -> None:
    gguf = _gguf()
    c = config
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    if (c.rope_scaling or {}).get("rope_type") == "linear":
        writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    file_types = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                  "i2_s": MOSTLY_I2_S}
    writer.add_file_type(int(file_types[weight_format]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if c.bos_token_id is not None:
        writer.add_bos_token_id(c.bos_token_id)
    if c.stop_token_ids:
        writer.add_eos_token_id(c.stop_token_ids[0])


def _write_tokenizer(writer, tokenizer: Tokenizer, config: BitNetConfig) -> None:
    stop = config.stop_token_ids
    values = gguf_tokenizer.tokenizer_metadata(tokenizer, config.bos_token_id, stop[0] if stop else None)
    array_type = _gguf().GGUFValueType
    writer.add_tokenizer_model(values[gguf_tokenizer.MODEL_KEY])
    writer.add_tokenizer_pre(values[gguf_tokenizer.PRE_KEY])
    writer.add_list(gguf_tokenizer.TOKENS_KEY, values[gguf_tokenizer.TOKENS_KEY], array_type.STRING)
    writer.add_list(gguf_tokenizer.TYPES_KEY, values[gguf_tokenizer.TYPES_KEY], array_type.INT32)
    writer.add_list(gguf_tokenizer.MERGES_KEY, values[gguf_tokenizer.MERGES_KEY], array_type.STRING)
    writer.add_add_bos_token(values[gguf_tokenizer.ADD_BOS_KEY])


def _tensors(model: BitNetForCausalLM, weight_format: str):
    """``(GGUF name, array, raw)`` of every tensor; ``raw`` is ``(ggml type, element shape)`` for packed payloads."""
    if any(linear.input_norm is not None for _, linear in model.named_linears()):
        raise errors.GGUFError(
            "BitLinear input norms (use_rms_norm=True) have no tensor name in the GGUF architectures"
        )
    yield "token_embd.weight", *_table(model.embed_tokens)
    norms = dict((name, norm.weight) for name, norm in model.named_norms())
    for i in range(model.config.num_hidden_layers):
        for hf_name, gguf_name in layer_norms(model.config).items():
            yield f"blk.{i}.{gguf_name}.weight", norms[f"model.layers.{i}.{hf_name}.weight"], None
    linears = dict(model.named_linears())
    permuted = _permuted_rope_rows(model.config)
    for i in range(model.config.num_hidden_layers):
        for hf_name, gguf_name in PROJECTIONS.items():
            linear = linears[f"model.layers.{i}.{hf_name}"]
            if hf_name in permuted:
                linear = _reordered(linear, rope_row_order(linear.out_features, permuted[hf_name]))
            yield f"blk.{i}.{gguf_name}.weight", *_ternary_payload(linear, weight_format, f"blk.{i}.{gguf_name}")
            if linear.bias is not None:
                yield f"blk.{i}.{gguf_name}.bias", linear.bias, None
    yield "output_norm.weight", model.norm.weight, None
    if not model.tied:
        yield "output.weight", *_table(model.lm_head)
    factors = _rope_freq_factors(model.config)
    if factors is not None:
        yield ROPE_FREQS, factors, None


def _rope_freq_factors(config: BitNetConfig) -> np.ndarray | None:
    """The ``rope_freqs`` divisors of a Llama 3 (or GGUF-read) rope; None for plain and linear ropes."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") not in ("llama3", "freq_factors"):
        return None
    architecture = gguf_arch.architecture_for(config)
    if architecture != "llama":
        raise errors.GGUFError(
            f"a {scaling['rope_type']} rope is stored as {ROPE_FREQS}, which llama.cpp's {architecture!r} graph does "
            f"not read: such a model cannot be written as GGUF (use bn.save_pretrained)"
        )
    if scaling["rope_type"] == "freq_factors":
        return checked_freq_factors(scaling["freq_factors"], config.head_dim // 2)
    return llama3_freq_factors(config.head_dim, config.rope_theta, scaling)


def _table(embedding) -> tuple[np.ndarray, Any]:
    """An embedding table in its own precision (bf16 as raw words of type BF16; int8 dequantized to F32)."""
    gguf = _gguf()
    if embedding.dtype == "bf16":
        return embedding.table, (gguf.GGMLQuantizationType.BF16, embedding.table.shape)
    if embedding.dtype == "int8":
        return embedding.float_weights(), None
    return embedding.table, None


def _ternary_payload(linear: BitLinear, weight_format: str, name: str) -> tuple[np.ndarray, Any]:
    gguf = _gguf()
    rows, cols = linear.weight.shape
    if weight_format != "i2_s" and cols % TQ_BLOCK:
        raise errors.GGUFError(f"{name} has {cols} inputs; {weight_format} (ggml) needs a multiple of {TQ_BLOCK}, "
                               f"use weight_format='i2_s'")
    try:
        packed = pack(unpack(linear.weight), weight_format)
    except errors.FormatError as exc:
        raise errors.GGUFError(f"{name} cannot be written as {weight_format}: {exc}") from None
    if weight_format == "i2_s":
        # gguf's writer only knows the byte layout of its own types: give it the I2_S bytes
        # as opaque int8 with the element shape, and it records type 36 as it is.
        return packed.data.view(np.int8), (I2_S_TYPE, (rows, cols))
    types = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}
    return packed.data, (types[weight_format], packed.data.shape)

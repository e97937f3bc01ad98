"""Load and save HF-format BitNet checkpoints: ``config.json`` + safetensors (single or sharded).

Tensors are read with the ``safetensors`` package (numpy API, memory-mapped; bf16 through
``ml_dtypes``). Projections may be packed (``quantization_config.quant_method == "bitnet"``:
uint8 ``weight`` + ``weight_scale``) or plain float weights, which are quantized on load
with absmean.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import errors
from ..formats import PackedTernary, pack, unpack
from ..models import BitNetConfig, BitNetForCausalLM, bundled_path
from ..nn import BitLinear, RMSNorm
from ..nn.embedding import as_float32
from ..quant import TernaryTensor
from . import atomic
from .progress import Progress, ReportingDict

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_PACK = "hf"


def _safetensors():
    try:
        import ml_dtypes  # noqa: F401  (registers numpy's bfloat16, which safetensors needs for bf16)
        import safetensors
        import safetensors.numpy
    except ImportError as exc:
        raise errors.CheckpointError(
            f"reading HF checkpoints needs the safetensors and ml_dtypes packages ({exc}); "
            'install them with: pip install "bitnet-numba[hf]"'
        ) from None
    return safetensors


def read_json(file: Path) -> Any:
    """The JSON value in ``file``, or None when there is no such file; CheckpointError when it is not JSON."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.CheckpointError(f"{file} is not valid JSON ({exc}); re-download or re-save the model") from None


def read_config(path: str | Path) -> BitNetConfig:
    """The :class:`BitNetConfig` of the model directory ``path``."""
    raw = read_json(Path(path) / CONFIG_FILE)
    if raw is None:
        raise errors.CheckpointNotFoundError(f"no {CONFIG_FILE} in {path}: is it an HF model directory?")
    return BitNetConfig.from_dict(raw)


GENERATION_CONFIG_FILE = "generation_config.json"


def read_generation_config(path: str | Path | None = None) -> dict:
    """The sampling defaults of a model directory's ``generation_config.json`` (transformers' keys:
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``); ``{}`` when it has none. None: the bundled model.

    Raises
    ------
    CheckpointError when the file exists but is not a JSON object.
    """
    file = (bundled_path() if path is None else Path(path)) / GENERATION_CONFIG_FILE
    values = read_json(file)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise errors.CheckpointError(f"{file} must hold a JSON object, got {type(values).__name__}")
    return values


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index of a sharded checkpoint or the single file."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise errors.CheckpointError(f"{index} is not a valid safetensors index ({exc!r})") from None
        files = {name: _inside(path, shard, index) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise errors.CheckpointNotFoundError(
                    f"shard {shard.name} listed in {INDEX_FILE} is missing from {path}"
                )
        return files
    single = path / WEIGHTS_FILE
    if not single.is_file():
        raise errors.CheckpointNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {path}")
    return {}


def _inside(directory: Path, shard: object, index: Path) -> Path:
    """The shard file ``shard`` names, which must be a plain file name inside ``directory``.

    An index naming ``../x.safetensors`` or an absolute path would make the loader open files
    outside the model directory: refused.
    """
    if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or Path(shard).name != shard:
        raise errors.CheckpointError(
            f"{index} names shard {shard!r}: shards must be file names inside the model directory"
        )
    return directory / shard


class _TensorReader:
    """Tensors by name from one or several safetensors files, with checkpoint errors.

    A file is opened (memory-mapped) only while one tensor is copied out of it: pages a
    mapping has touched count in the process's memory until it is closed, so keeping the
    files open would add the checkpoint's size on top of the model being built.
    """

    def __init__(self, path: Path) -> None:
        self.safetensors = _safetensors()
        self.names: dict[str, Path] = {}
        self.used: set[str] = set()
        files = _weight_files(path)
        for file in sorted(set(files.values())) or [path / WEIGHTS_FILE]:
            with self._open(file) as handle:
                self.names.update(dict.fromkeys(handle.keys(), file))

    def _open(self, file: Path):
        try:
            return self.safetensors.safe_open(str(file), framework="np")
        except Exception as exc:  # safetensors raises its own untyped errors for bad files
            raise errors.CheckpointError(
                f"{file} is not a readable safetensors file ({exc}); it may be truncated or corrupt: "
                f"re-download or re-save it"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def _handle_of(self, name: str) -> tuple[object, Path]:
        if name not in self.names:
            raise errors.CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        self.used.add(name)
        return self._open(self.names[name]), self.names[name]

    def check_all_used(self, config: BitNetConfig) -> None:
        """CheckpointError for a tensor the model did not read: the config describes another network."""
        ignorable = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if config.tie_word_embeddings else ())
        unused = sorted(name for name in set(self.names) - self.used if not name.endswith(ignorable))
        if unused:
            raise errors.CheckpointError(
                f"tensor {unused[0]!r} (and {len(unused) - 1} more) is not part of the "
                f"{config.num_hidden_layers}-layer {config.default_architecture()} model config.json describes: "
                f"the config and the weights disagree"
            )

    def header(self, name: str) -> tuple[str, list[int]]:
        """The safetensors dtype ("U8", "BF16", ...) and shape of tensor ``name``, read from the header only."""
        handle, _ = self._handle_of(name)
        with handle:
            view = handle.get_slice(name)
            return view.get_dtype(), list(view.get_shape())

    def shape(self, name: str) -> list[int]:
        """The stored shape of tensor ``name``."""
        return self.header(name)[1]

    def is_packed(self, name: str) -> bool:
        """Whether tensor ``name`` is stored as uint8 (packed ternary codes), read from the header only."""
        return self.header(name)[0] == "U8"

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of tensor ``name``."""
        handle, file = self._handle_of(name)
        with handle:
            try:
                return handle.get_slice(name)[start:stop]
            except Exception as exc:
                raise errors.CheckpointError(
                    f"cannot read tensor {name!r} from {file} ({exc}); the file may be corrupt"
                ) from None

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor ``name``; CheckpointError when missing, unreadable or not of ``shape``."""
        handle, file = self._handle_of(name)
        with handle:
            try:
                tensor = handle.get_tensor(name)
            except Exception as exc:
                raise errors.CheckpointError(
                    f"cannot read tensor {name!r} from {file} ({exc}); the file may be corrupt"
                ) from None
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise errors.CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} but the config implies {tuple(shape)}: "
                f"config.json and the weights disagree"
            )
        return tensor


TABLE_ROWS_PER_READ = 8192


def _read_table(reader: _TensorReader, name: str, shape: tuple[int, int]) -> np.ndarray:
    """An embedding table, copied out a block of rows per file opening.

    The table is the biggest tensor (656 MB of bf16 for 2B4T); reading it in one go would hold
    its mapped file pages and its copy in memory at the same time.
    """
    first = reader.get_rows(name, 0, 1)
    if tuple(reader.shape(name)) != tuple(shape):
        raise errors.CheckpointError(
            f"tensor {name!r} has shape {tuple(reader.shape(name))} but the config implies {tuple(shape)}: "
            f"config.json and the weights disagree"
        )
    if first.dtype.kind != "f" and first.dtype.name != "bfloat16":
        raise errors.CheckpointError(f"embedding tables must be float, got dtype {first.dtype}")
    table = np.empty(shape, first.dtype)
    for start in range(0, shape[0], TABLE_ROWS_PER_READ):
        stop = min(start + TABLE_ROWS_PER_READ, shape[0])
        table[start:stop] = reader.get_rows(name, start, stop)
    return table


def _as_float32(tensor: np.ndarray) -> np.ndarray:
    if tensor.dtype.kind != "f" and tensor.dtype.name != "bfloat16":
        raise errors.CheckpointError(f"expected a float tensor, got dtype {tensor.dtype}")
    return as_float32(tensor)


def _read_linear(reader: _TensorReader, name: str, shape: tuple[int, int], config: BitNetConfig) -> BitLinear:
    out_features, in_features = shape
    bias = _as_float32(reader.get(f"{name}.bias", (out_features,))) if f"{name}.bias" in reader else None
    input_norm = None
    if config.use_rms_norm:
        norm_weight = _as_float32(reader.get(f"{name}.rms_norm.weight", (in_features,)))
        input_norm = RMSNorm(norm_weight, config.linear_rms_norm_eps)
    weight = reader.get(f"{name}.weight")
    has_scale = f"{name}.weight_scale" in reader
    scale = _as_float32(reader.get(f"{name}.weight_scale")).reshape(-1) if has_scale else None
    if scale is not None and scale.size != 1:
        raise errors.CheckpointError(f"{name}.weight_scale must hold one value, got shape {scale.shape}")
    divide = config.linear_class == "bitlinear"
    if weight.dtype == np.uint8:
        expected = (-(-out_features // 4), in_features)
        if tuple(weight.shape) != expected:
            raise errors.CheckpointError(
                f"packed tensor {name}.weight has shape {tuple(weight.shape)} but the config implies {expected} "
                f"(a {out_features}x{in_features} projection, 4 weights per byte): config.json and the weights disagree"
            )
        if scale is None:
            raise errors.CheckpointError(f"packed tensor {name}.weight has no {name}.weight_scale")
        data, format = weight, HF_PACK
    else:
        if tuple(weight.shape) != shape:
            raise errors.CheckpointError(
                f"tensor {name}.weight has shape {tuple(weight.shape)} but the config implies {shape}: "
                f"config.json and the weights disagree"
            )
        values = _as_float32(weight)
        if scale is None:
            return _corrupt_as_checkpoint_error(name, BitLinear.from_float, values, bias, input_norm)
        # Unpacked ternary values with a separate scale (HF AutoBitLinear saved unpacked).
        codes = values.astype(np.int8)
        if not np.array_equal(codes, values) or np.abs(codes).max(initial=0) > 1:
            raise errors.CheckpointError(f"{name}.weight has a weight_scale, so it must hold only -1, 0 and +1")
        data, format = pack_codes(codes).data, HF_PACK
    return _corrupt_as_checkpoint_error(name, BitLinear.from_packed, data, shape, scale[0], format, divide, bias,
                                        input_norm)


def _corrupt_as_checkpoint_error(name: str, build, *args) -> BitLinear:
    """``build(*args)``; its refusal of the values (bad codes, NaN weights or scales) as a CheckpointError."""
    try:
        return build(*args)
    except (errors.FormatError, errors.InvalidValueError) as exc:
        raise errors.CheckpointError(f"tensor {name}.weight is corrupt: {exc}") from None


def pack_codes(codes: np.ndarray) -> PackedTernary:
    """Ternary int8 codes ``(m, k)`` in the HF packed layout (unit scale)."""
    return pack(TernaryTensor(codes, np.float32(1.0).reshape(())), HF_PACK)


def load_pretrained(
    path: str | Path | None = None, head_dtype: str = "auto", progress: Progress | None = None
) -> BitNetForCausalLM:
    """Load an HF ``BitNetForCausalLM`` checkpoint directory (or a ``.gguf`` file).

    Parameters
    ----------
    path : directory holding ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json`` with its shards); a path ending in ``.gguf`` is
        read by :func:`bitnet.load_gguf`; None loads the model shipped in the package
        (:func:`bitnet.models.bundled_path`).
    head_dtype : storage of the embedding / output head: "auto" (as in the checkpoint),
        "f32", "f16", "bf16" or "int8" (per-row absmax, half of bf16's memory traffic).
    progress : called as ``progress(done, total)`` after each weight is read (e.g. to drive
        a progress bar; ``total`` is the model's number of weights).

    Returns
    -------
    BitNetForCausalLM

    Raises
    ------
    CheckpointNotFoundError when the directory or a file is missing; ConfigError for a
    ``model_type`` other than "bitnet" or an unsupported option; CheckpointError for a
    truncated or corrupt safetensors file, a missing tensor, or a shape that disagrees with
    the config.
    """
    path = bundled_path() if path is None else Path(path)
    if path.suffix.lower() == ".gguf":
        from .gguf import load_gguf

        return load_gguf(path, head_dtype, progress)
    if not path.is_dir():
        raise errors.CheckpointNotFoundError(f"model directory {path} does not exist")
    config = read_config(path)
    c = config
    reader = _TensorReader(path)
    weights = ReportingDict(c.weight_count(), progress)
    for i in range(c.num_hidden_layers):
        for short, shape in c.linear_shapes().items():
            name = f"model.layers.{i}.{short}"
            weights[name] = _read_linear(reader, name, shape, c)
        for norm, size in c.norm_shapes().items():
            name = f"model.layers.{i}.{norm}.weight"
            weights[name] = _as_float32(reader.get(name, (size,)))
    weights["model.norm.weight"] = _as_float32(reader.get("model.norm.weight", (c.hidden_size,)))
    table_shape = (c.vocab_size, c.hidden_size)
    weights["model.embed_tokens.weight"] = _read_table(reader, "model.embed_tokens.weight", table_shape)
    if not c.tie_word_embeddings:
        weights["lm_head.weight"] = _read_table(reader, "lm_head.weight", table_shape)
    reader.check_all_used(c)
    return BitNetForCausalLM.from_weights(config, weights, head_dtype)


def read_weights(path: str | Path, config: BitNetConfig) -> dict[str, np.ndarray | TernaryTensor]:
    """Every tensor of an HF BitNet checkpoint by HF name, for training to go on from it.

    Packed projection weights (or ternary ones with a ``weight_scale``) come as a
    :class:`TernaryTensor` (codes and the float32 scale they multiply by, ``weight_scale`` or
    its inverse as the config's ``linear_class`` says); every other tensor, float projections
    included, as float32. Raises as :func:`load_pretrained`.
    """
    reader = _TensorReader(Path(path))
    weights: dict[str, np.ndarray | TernaryTensor] = {}
    projections = set()
    for i in range(config.num_hidden_layers):
        for short, shape in config.linear_shapes().items():
            name = f"model.layers.{i}.{short}"
            projections.add(name)
            if reader.is_packed(f"{name}.weight") or f"{name}.weight_scale" in reader:
                weights[f"{name}.weight"] = unpack(_read_linear(reader, name, shape, config).weight)
            else:
                weights[f"{name}.weight"] = _as_float32(reader.get(f"{name}.weight", shape))
    layers = tuple(f"model.layers.{i}." for i in range(config.num_hidden_layers))
    for name in reader.names:  # norms, embeddings, head and biases
        if name.startswith("model.layers.") and not name.startswith(layers):
            continue  # a layer the config does not have: check_all_used names it
        if not (name.endswith(".weight") and name.rpartition(".")[0] in projections) and not name.endswith(
            ".weight_scale"
        ):
            weights[name] = _as_float32(reader.get(name))
    reader.check_all_used(config)
    return weights


def _embedding_tensor(embedding) -> np.ndarray:
    """The table in a dtype safetensors can store (int8 tables are written dequantized, as float32)."""
    if embedding.dtype == "bf16":
        import ml_dtypes

        return embedding.table.view(ml_dtypes.bfloat16)
    if embedding.dtype == "int8":
        return embedding.float_weights()
    return embedding.table


def _packed_tensors(name: str, linear: BitLinear, linear_class: str) -> Iterator[tuple[str, np.ndarray]]:
    """The ``weight`` / ``weight_scale`` (/ ``bias``) tensors of one projection in HF packed form."""
    ternary = unpack(linear.weight)
    hf = pack(type(ternary)(ternary.codes, np.float32(1.0).reshape(())), HF_PACK)
    divide = linear_class == "bitlinear"
    if linear.checkpoint_scale is not None and linear.checkpoint_scale[1] == divide:
        stored = linear.checkpoint_scale[0]
    else:
        scale = np.float32(linear.weight.scale)
        stored = np.float32(1.0) / scale if divide else scale
    yield f"{name}.weight", hf.data
    yield f"{name}.weight_scale", np.asarray(stored, np.float32).reshape(1)
    if linear.bias is not None:
        yield f"{name}.bias", linear.bias


def save_pretrained(model: BitNetForCausalLM, path: str | Path) -> None:
    """Write ``model`` as an HF packed BitNet checkpoint: ``config.json`` + ``model.safetensors``.

    Projections are stored packed (uint8, 4 weights per byte, HF layout) with a float32
    ``weight_scale`` following the config's ``linear_class``; norms as float32; the
    embedding (and untied head) in their storage dtype (int8 tables as float32). Both files
    are written completely beside their targets before either replaces an existing one, so a
    failure leaves an earlier checkpoint in ``path`` as it was.
    """
    safetensors = _safetensors()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, linear in model.named_linears():
        tensors.update(_packed_tensors(name, linear, model.config.linear_class))
    for name, norm in model.named_norms():
        tensors[name] = norm.weight
    tensors["model.embed_tokens.weight"] = _embedding_tensor(model.embed_tokens)
    if not model.tied:
        tensors["lm_head.weight"] = _embedding_tensor(model.lm_head)
    tensors = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    config = json.dumps(model.config.to_dict(), indent=2) + "\n"
    with atomic.replacing(path / WEIGHTS_FILE, path / CONFIG_FILE) as (weights_file, config_file):
        safetensors.numpy.save_file(tensors, str(weights_file), metadata={"format": "pt"})
        config_file.write_text(config)

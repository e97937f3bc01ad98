"""Checkpoint I/O without transformers: save/load round trips, sharded files, tokenizers, and the errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bitnet as bn

pytest.importorskip("safetensors")
pytest.importorskip("ml_dtypes")
from safetensors.numpy import load_file, save_file  # noqa: E402

TINY = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, eos_token_id=None, bos_token_id=None)
IDS = np.array([3, 14, 15, 92, 65, 35])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random model and the directory it was saved to."""
    model = bn.models.random_model(bn.BitNetConfig(**TINY, tie_word_embeddings=False), seed=1, head_dtype="f32")
    path = tmp_path_factory.mktemp("tiny")
    bn.save_pretrained(model, path)
    return model, path


def copy_checkpoint(src, dst, tensors=None, config=None):
    """``src`` rewritten into ``dst`` with its tensors and/or config.json dict replaced."""
    dst.mkdir(exist_ok=True)
    save_file(load_file(src / "model.safetensors") if tensors is None else tensors, dst / "model.safetensors")
    raw = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(raw if config is None else config(raw)))
    return dst


def test_round_trip_keeps_bytes_and_logits(saved, tmp_path):
    model, path = saved
    loaded = bn.load_pretrained(path)
    np.testing.assert_array_equal(loaded.forward(IDS), model.forward(IDS))
    bn.save_pretrained(loaded, tmp_path)
    first, second = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype and first[name].tobytes() == second[name].tobytes(), name
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "bitnet"


def test_sharded_checkpoint_loads_like_the_single_file(saved, tmp_path):
    model, path = saved
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, members in shards.items():
        save_file({name: tensors[name] for name in members}, tmp_path / shard)
        weight_map.update({name: shard for name in members})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    np.testing.assert_array_equal(bn.load_pretrained(tmp_path).forward(IDS), model.forward(IDS))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/dir.safetensors", "",
                                   None, 3])
def test_index_naming_a_shard_outside_the_directory_is_refused(saved, tmp_path, shard):
    """A weight_map entry may only name a file inside the model directory (no traversal, no absolute path)."""
    _, path = saved
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file(load_file(path / "model.safetensors"), tmp_path / "outside.safetensors")  # what traversal would open
    (model_dir / "config.json").write_text((path / "config.json").read_text())
    weight_map = dict.fromkeys(load_file(path / "model.safetensors"), shard)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(bn.CheckpointError, match="shards must be file names inside the model directory"):
        bn.load_pretrained(model_dir)


@pytest.mark.parametrize("head_dtype", ["bf16", "int8", "f16"])
def test_head_dtype_option_changes_storage_only_slightly(saved, head_dtype):
    model, path = saved
    loaded = bn.load_pretrained(path, head_dtype=head_dtype)
    assert loaded.lm_head.dtype == head_dtype and loaded.embed_tokens.dtype == head_dtype
    reference = model.forward(IDS)
    assert np.abs(loaded.forward(IDS) - reference).max() <= 0.05 * np.abs(reference).max()


def test_bf16_float_checkpoint_is_quantized_with_absmean_on_load(saved, tmp_path):
    import ml_dtypes

    _, path = saved
    rng = np.random.default_rng(0)
    tensors = load_file(path / "model.safetensors")
    shapes = bn.io.read_config(path).linear_shapes()
    floats = {}
    for name in list(tensors):
        if name.endswith("weight_scale"):
            del tensors[name]
        elif tensors[name].dtype == np.uint8:  # packed projection -> random bf16 float weights
            shape = shapes[name.split(".", 3)[3].rsplit(".", 1)[0]]
            floats[name] = rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
            tensors[name] = floats[name]
    config = copy_checkpoint(path, tmp_path, tensors, lambda raw: {**raw, "quantization_config": None})
    model = bn.load_pretrained(config)
    layer = model.layers[1].mlp.down_proj
    expected = bn.quantize_weights(floats["model.layers.1.mlp.down_proj.weight"].astype(np.float32))
    np.testing.assert_array_equal(bn.unpack(layer.weight).codes, expected.codes)
    assert float(layer.weight.scale) == float(expected.scale)


def test_missing_directory_and_files(saved, tmp_path):
    _, path = saved
    with pytest.raises(bn.CheckpointNotFoundError, match="does not exist"):
        bn.load_pretrained(tmp_path / "nowhere")
    with pytest.raises(bn.CheckpointNotFoundError, match="config.json"):
        bn.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(bn.CheckpointNotFoundError, match="model.safetensors"):
        bn.load_pretrained(tmp_path)
    assert isinstance(bn.CheckpointNotFoundError("x"), FileNotFoundError)


def test_unsupported_model_type_and_rope(saved, tmp_path):
    _, path = saved
    copy_checkpoint(path, tmp_path / "llama", config=lambda raw: {**raw, "model_type": "gpt2"})
    with pytest.raises(bn.ConfigError, match="unsupported model_type 'gpt2'"):
        bn.load_pretrained(tmp_path / "llama")
    copy_checkpoint(path, tmp_path / "yarn", config=lambda raw: {**raw, "rope_parameters": {"rope_type": "yarn"}})
    with pytest.raises(bn.ConfigError, match="rope type 'yarn'"):
        bn.load_pretrained(tmp_path / "yarn")
    (tmp_path / "llama" / "config.json").write_text("{not json")
    with pytest.raises(bn.CheckpointError, match="not valid JSON"):
        bn.load_pretrained(tmp_path / "llama")


def test_weights_of_another_family_or_extra_layers_are_refused(saved, tmp_path):
    """A BitNet checkpoint relabeled as the Llama-architecture family keeps sub-norm tensors no Llama has."""
    _, path = saved
    copy_checkpoint(path, tmp_path / "llama", config=lambda raw: {**raw, "model_type": "llama"})
    with pytest.raises(bn.CheckpointError, match="sub_norm.*not part of the 2-layer LlamaForCausalLM"):
        bn.load_pretrained(tmp_path / "llama")
    copy_checkpoint(path, tmp_path / "fewer", config=lambda raw: {**raw, "num_hidden_layers": 1})
    with pytest.raises(bn.CheckpointError, match="model.layers.1.* is not part of the 1-layer"):
        bn.load_pretrained(tmp_path / "fewer")


@pytest.mark.parametrize("key, value", [("intermediate_size", 128), ("num_key_value_heads", 4), ("vocab_size", 121)])
def test_shape_disagreeing_with_config(saved, tmp_path, key, value):
    _, path = saved
    copy_checkpoint(path, tmp_path, config=lambda raw: {**raw, key: value})
    with pytest.raises(bn.CheckpointError, match="config .*disagree|implies"):
        bn.load_pretrained(tmp_path)


def test_missing_tensor(saved, tmp_path):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.ffn_sub_norm.weight"]
    copy_checkpoint(path, tmp_path, tensors)
    with pytest.raises(bn.CheckpointError, match="ffn_sub_norm.weight' is missing"):
        bn.load_pretrained(tmp_path)


def test_truncated_safetensors(saved, tmp_path):
    _, path = saved
    copy_checkpoint(path, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(bn.CheckpointError, match="truncated or corrupt"):
        bn.load_pretrained(tmp_path)


@pytest.mark.parametrize("offset", [0, 3, 8, 12, 40])
def test_corrupt_safetensors_header(saved, tmp_path, offset):
    _, path = saved
    copy_checkpoint(path, tmp_path)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    for i in range(offset, offset + 4):
        data[i] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(bn.CheckpointError):
        bn.load_pretrained(tmp_path)


def test_corrupt_packed_weights_are_reported(saved, tmp_path):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"][0, :4] = 0xFF  # the 2-bit value 3 encodes no ternary code
    copy_checkpoint(path, tmp_path, tensors)
    with pytest.raises(bn.CheckpointError, match="o_proj.weight is corrupt"):
        bn.load_pretrained(tmp_path)


def write_word_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"[UNK]": vocab_size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))


def test_tokenizer_and_cli_generate(saved, tmp_path, capsys):
    pytest.importorskip("tokenizers")
    model, path = saved
    assert bn.load_tokenizer(path) is None
    copy_checkpoint(path, tmp_path)
    write_word_tokenizer(tmp_path, model.config.vocab_size)
    tokenizer = bn.load_tokenizer(tmp_path)
    ids = tokenizer.encode("w3 w14 w15").ids
    assert ids == [3, 14, 15]
    # Token healing: the prompt's last token ("w15") is generated again, from the tokens that extend its text.
    healed = model.generate(ids[:-1], 5, first_tokens=[ids[-1]])
    assert healed[1:] == model.generate(ids, 4)
    from bitnet.cli import main

    assert main(["generate", str(tmp_path), "--prompt", "w3 w14 w15", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("w3 w14 " + tokenizer.decode(healed))
    assert "prompt: 3 tokens" in out and "decode: 4 tokens" in out and "tok/s" in out and "f32 head" in out
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(bn.CheckpointError, match="tokenizer"):
        bn.load_tokenizer(tmp_path)


def test_config_reads_hf_keys_and_defaults_like_transformers():
    config = bn.BitNetConfig.from_dict({"model_type": "bitnet", "hidden_size": 64, "num_attention_heads": 8,
                                        "num_key_value_heads": None, "rope_theta": 10000.0,
                                        "quantization_config": {"quant_method": "bitnet",
                                                                "linear_class": "autobitlinear"}})
    assert (config.num_key_value_heads, config.head_dim, config.rope_theta) == (8, 8, 10000.0)
    assert config.linear_class == "autobitlinear" and not config.tie_word_embeddings
    legacy = bn.BitNetConfig.from_dict({"model_type": "bitnet", "rope_scaling": None, "eos_token_id": [1, 2]})
    assert legacy.rope_theta == 500000.0 and legacy.stop_token_ids == [1, 2]
    with pytest.raises(bn.ConfigError, match="linear_class"):
        bn.BitNetConfig.from_dict({"model_type": "bitnet", "quantization_config": {"linear_class": "fancy"}})


def test_unpacked_ternary_weights_with_weight_scale_load_like_packed(saved, tmp_path):
    """AutoBitLinear checkpoints may hold the codes as floats beside ``weight_scale``."""
    model, path = saved
    tensors = load_file(path / "model.safetensors")
    shapes = bn.io.read_config(path).linear_shapes()
    for name in list(tensors):
        if tensors[name].dtype == np.uint8:
            shape = shapes[name.split(".", 3)[3].rsplit(".", 1)[0]]
            packed = bn.PackedTernary("hf", shape, tensors[name], np.float32(1.0).reshape(()))
            tensors[name] = bn.unpack(packed).codes.astype(np.float32)
    copy_checkpoint(path, tmp_path, tensors)
    np.testing.assert_array_equal(bn.load_pretrained(tmp_path).forward(IDS), model.forward(IDS))
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = 0.5
    copy_checkpoint(path, tmp_path, tensors)
    with pytest.raises(bn.CheckpointError, match="only -1, 0 and \\+1"):
        bn.load_pretrained(tmp_path)


def test_cli_generate_reports_errors_without_a_traceback(saved, tmp_path, capsys):
    from bitnet.cli import main

    _, path = saved
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(path), "--prompt", "hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [
    ("num_key_value_heads", 0), ("num_attention_heads", 0), ("hidden_size", "64"), ("hidden_size", 64.0),
    ("num_hidden_layers", [2]), ("vocab_size", True), ("intermediate_size", -96), ("head_dim", 15),
    ("head_dim", 0), ("rms_norm_eps", 0.0), ("rms_norm_eps", float("nan")), ("rms_norm_eps", "1e-5"),
    ("max_position_embeddings", float("inf")), ("tie_word_embeddings", "false"), ("bos_token_id", -1),
    ("eos_token_id", [1, "x"]), ("quantization_config", [1]), ("rope_parameters", 5), ("architectures", "x"),
])
def test_config_with_a_wrong_type_or_range_names_the_key(saved, tmp_path, key, value):
    """Each of these once raised ZeroDivisionError/TypeError/ValueError, or built a model that could not run."""
    _, path = saved
    raw = json.loads((path / "config.json").read_text())
    with pytest.raises(bn.ConfigError, match=key):
        bn.BitNetConfig.from_dict({**raw, key: value})
    copy_checkpoint(path, tmp_path, config=lambda raw: {**raw, key: value})
    with pytest.raises(bn.ConfigError, match=key):
        bn.load_pretrained(tmp_path)


def test_config_checks_nested_numbers_and_direct_construction():
    for rope in ({"rope_type": "default", "rope_theta": "x"}, {"rope_type": "default", "rope_theta": -1.0}):
        with pytest.raises(bn.ConfigError, match="rope_theta"):
            bn.BitNetConfig.from_dict({"model_type": "bitnet", "rope_parameters": rope})
    with pytest.raises(bn.ConfigError, match="rms_norm_eps"):
        bn.BitNetConfig.from_dict({"model_type": "bitnet", "quantization_config": {"rms_norm_eps": "tiny"}})
    with pytest.raises(bn.ConfigError, match="must hold a JSON object"):
        bn.BitNetConfig.from_dict([])
    for bad in (dict(num_key_value_heads=0), dict(hidden_size=10, num_attention_heads=20), dict(head_dim=3),
                dict(rope_theta=float("nan")), dict(use_rms_norm=1)):
        with pytest.raises(bn.ConfigError, match=next(iter(bad)) if "hidden_size" not in bad else "head_dim"):
            bn.BitNetConfig(**bad)
    config = bn.BitNetConfig(vocab_size=np.int64(100), rms_norm_eps=1)  # numpy ints and int eps are fine
    assert type(config.vocab_size) is int and config.rms_norm_eps == 1.0


def copy_with_weight_scale(saved, dst, projection: str, stored: float, linear_class: str):
    """The saved checkpoint copied to ``dst`` with ``projection``'s ``weight_scale`` stored as ``stored``."""
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    tensors[f"{projection}.weight_scale"] = np.array([stored], np.float32)

    def config(raw):
        return {**raw, "quantization_config": {**raw["quantization_config"], "linear_class": linear_class}}

    return copy_checkpoint(path, dst, tensors, config)


@pytest.mark.parametrize("stored", [0.0, float("nan"), float("inf"), -2.0])
@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_bad_weight_scales_are_refused(saved, tmp_path, stored, linear_class):
    copy_with_weight_scale(saved, tmp_path, "model.layers.1.mlp.down_proj", stored, linear_class)
    with pytest.raises(bn.CheckpointError, match="down_proj.* scale"):
        bn.load_pretrained(tmp_path)


@pytest.mark.parametrize("linear_class, stored", [("bitlinear", 1e-38), ("autobitlinear", 1e38)])
def test_scales_that_overflow_float32_activations_are_refused(saved, tmp_path, linear_class, stored):
    copy_with_weight_scale(saved, tmp_path, "model.layers.0.self_attn.o_proj", stored, linear_class)
    with pytest.raises(bn.CheckpointError, match="o_proj' has scale.*must lie in"):
        bn.load_pretrained(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_norms_holding_nan_or_inf_are_refused(saved, tmp_path, value):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.post_attention_layernorm.weight"][3] = value
    copy_checkpoint(path, tmp_path, tensors)
    with pytest.raises(bn.CheckpointError, match="post_attention_layernorm.weight' must hold finite"):
        bn.load_pretrained(tmp_path)


def test_read_weights_refuses_layers_the_config_lacks(saved, tmp_path):
    _, path = saved
    copy_checkpoint(path, tmp_path, config=lambda raw: {**raw, "num_hidden_layers": 1})
    with pytest.raises(bn.CheckpointError, match="model.layers.1.* is not part of the 1-layer"):
        bn.io.read_weights(tmp_path, bn.io.read_config(tmp_path))
    assert "model.layers.1.input_layernorm.weight" in bn.io.read_weights(path, bn.io.read_config(path))


def test_from_weights_checks_every_tensor_against_the_config(saved):
    model, _ = saved
    config = model.config
    weights = dict(model.named_linears())
    weights.update({name: norm.weight for name, norm in model.named_norms()})
    weights["model.embed_tokens.weight"] = model.embed_tokens.table
    weights["lm_head.weight"] = model.lm_head.table
    np.testing.assert_array_equal(bn.BitNetForCausalLM.from_weights(config, weights).forward(IDS), model.forward(IDS))

    def refused(match, **changes):
        with pytest.raises(bn.CheckpointError, match=match):
            bn.BitNetForCausalLM.from_weights(config, {**weights, **changes})

    missing = dict(weights)
    del missing["model.layers.1.self_attn.k_proj"]
    with pytest.raises(bn.CheckpointError, match="k_proj' .* is missing"):
        bn.BitNetForCausalLM.from_weights(config, missing)
    refused("not part of the model", **{"model.layers.2.input_layernorm.weight": np.ones(64, np.float32)})
    other = bn.nn.BitLinear.from_float(np.ones((64, 64), np.float32))
    refused(r"k_proj' is 64x64 but the config implies 32x64", **{"model.layers.0.self_attn.k_proj": other})
    refused("must be a BitLinear", **{"model.layers.0.self_attn.k_proj": np.ones((32, 64), np.float32)})
    refused(r"shape \(64,\)", **{"model.norm.weight": np.ones(65, np.float32)})
    refused(r"shape \(120, 64\)", **{"model.embed_tokens.weight": np.ones((121, 64), np.float32)})
    refused("finite", **{"model.norm.weight": np.full(64, np.nan, np.float32)})


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_gguf_output_scales_are_checked_by_the_same_validation(tmp_path, factor):
    """llama.cpp's ``blk.N.*.scale`` multipliers end up in the projection scale, which from_weights checks."""
    pytest.importorskip("gguf")
    from test_gguf import tiny_model, write_foreign_gguf

    def projection(codes, scale):
        return [("weight", codes.astype(np.float32), None), ("scale", np.array([factor], np.float32), None)]

    write_foreign_gguf(tmp_path / "bad.gguf", tiny_model(), projection, arch="bitnet-b1.58")
    with pytest.raises(bn.CheckpointError, match="has scale"):
        bn.load_gguf(tmp_path / "bad.gguf")


def test_a_config_claiming_billions_of_layers_is_refused_without_allocating_for_them(saved, tmp_path):
    _, path = saved
    copy_checkpoint(path, tmp_path, config=lambda raw: {**raw, "num_hidden_layers": 2**31})
    with pytest.raises(bn.CheckpointError, match="missing|disagree"):
        bn.load_pretrained(tmp_path)  # found by the HF fuzzer: listing 2**31 layers' weight names took 24 GB
    model = bn.load_pretrained(path)
    config = bn.BitNetConfig(**{**vars(model.config), "num_hidden_layers": 2**31})
    weights = {name: norm.weight for name, norm in model.named_norms()}
    with pytest.raises(bn.CheckpointError, match="at least .* more\\) is missing"):
        bn.BitNetForCausalLM.from_weights(config, weights)

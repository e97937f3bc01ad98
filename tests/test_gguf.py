"""GGUF: round trips in every weight format, files of other converters, tokenizer, errors.

Helpers build tiny random models and write GGUF files the way other converters do,
with gguf's writer alone; test_gguf_fuzz.py reuses them.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import bitnet as bn
from bitnet.choices import GGUF_WEIGHT_FORMATS
from bitnet.io.gguf import GGUFFile, GGUFTensor, read_ternary, save_gguf
from bitnet.io.gguf_tokenizer import LLAMA3_PATTERN, build_tokenizer
from bitnet.nn import BitLinear
from bitnet.quant import TernaryTensor

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
CORPUS = [
    "BitNet b1.58 stores every weight as -1, 0 or +1, with one scale per tensor.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps on.",
    "Ternary networks run fast on CPUs: 2 bits a weight, integer adds, no multiplies!",
    "Numbers like 12345 and 3.14159 are split in groups of three digits.",
    "Émile a mangé 3 crêpes à Zürich — naïve café façade.",
    "    indented code:\n\tdef f(x):\n\t\treturn x * 2\n",
] * 4


def train_tokenizer(vocab_size: int = 320, llama3: bool = True) -> Tokenizer:
    """A byte-level BPE trained the HF way (Llama-3 split regex when ``llama3``), BOS added in front."""
    tokenizer = Tokenizer(models.BPE(ignore_merges=llama3))
    if llama3:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    if llama3:
        bos = tokenizer.token_to_id(BOS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    return tokenizer


# The families' settings (bn.BitNetConfig): 2B4T (relu2, sub-norms), 1bitLLM (silu, sub-norms), Llama ternary.
FAMILIES = {
    "2b4t": dict(model_type="bitnet", hidden_act="relu2", sub_norms=True),
    "1bitllm": dict(model_type="llama", hidden_act="silu", sub_norms=True),
    "llama": dict(model_type="llama", hidden_act="silu", sub_norms=False),
}
ARCHITECTURE_OF = {"2b4t": "bitnet-b1.58", "1bitllm": "bitnet", "llama": "llama"}


def tiny_model(vocab: int = 48, hidden: int = 256, intermediate: int = 512, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, head_dtype: str = "f32", tied: bool = True, seed: int = 0,
               fp16_scales: bool = True, granularity: str = "tensor", family: str = "2b4t",
               rope: dict | None = None) -> bn.BitNetForCausalLM:
    """A random model of ``family``; with ``fp16_scales`` every projection scale is exact in fp16 (as TQ stores it).

    ``granularity`` "channel" gives every projection one scale per output row; ``rope`` is its ``rope_scaling``.
    """
    rng = np.random.default_rng(seed)
    config = bn.BitNetConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, rope_scaling=rope,
        **FAMILIES[family])
    weights: dict[str, object] = {}
    for i in range(layers):
        for name, shape in config.linear_shapes().items():
            codes = rng.integers(-1, 2, shape).astype(np.int8)
            scale = rng.uniform(0.02, 0.2, (shape[0], 1) if granularity == "channel" else ()).astype(np.float32)
            if fp16_scales:
                scale = scale.astype(np.float16).astype(np.float32)
            weights[f"model.layers.{i}.{name}"] = BitLinear(bn.pack(TernaryTensor(codes, scale, granularity), "i2"))
        for name, size in config.norm_shapes().items():
            weights[f"model.layers.{i}.{name}.weight"] = rng.uniform(0.5, 1.5, size).astype(np.float32)
    weights["model.norm.weight"] = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    weights["model.embed_tokens.weight"] = rng.standard_normal((vocab, hidden)).astype(np.float32)
    if not tied:
        weights["lm_head.weight"] = rng.standard_normal((vocab, hidden)).astype(np.float32)
    return bn.BitNetForCausalLM.from_weights(config, weights, head_dtype)


# llama.cpp names of a decoder layer's tensors, by HF name.
LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm",
    "self_attn.inner_attn_ln": "attn_sub_norm", "mlp.ffn_layernorm": "ffn_sub_norm",
}


def write_foreign_gguf(path, model: bn.BitNetForCausalLM, projection, embedding=None, arch: str = "bitnet") -> None:
    """Write ``model`` with gguf's writer alone, the way other converters do (not through bitnet).

    ``projection(codes, scale)`` returns ``[(suffix, array, raw_dtype), ...]`` for one
    projection (suffix "weight" or "scale"); ``embedding(table)`` returns ``(array, raw_dtype)``.
    """
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    # What bitnet.cpp's converter writes: "linear" scaling by 1, i.e. none.
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(1.0)
    table = model.embed_tokens.float_weights()
    array, raw = embedding(table) if embedding else (table, None)
    writer.add_tensor("token_embd.weight", array, raw_dtype=raw)
    norms = dict((name, norm.weight) for name, norm in model.named_norms())
    for name, linear in model.named_linears():
        t = bn.unpack(linear.weight)
        i, hf = int(name.split(".")[2]), name.split(".", 3)[3]
        for suffix, array, raw in projection(t.codes, np.float32(t.scale)):
            writer.add_tensor(f"blk.{i}.{LAYER_TENSORS[hf]}.{suffix}", array, raw_dtype=raw)
    for name, weight in norms.items():
        if name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", weight)
        else:
            i, hf = int(name.split(".")[2]), name.split(".", 3)[3].removesuffix(".weight")
            writer.add_tensor(f"blk.{i}.{LAYER_TENSORS[hf]}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------
# Fixtures

IDS = np.array([0, 5, 17, 3, 42, 9, 11])


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """The tiny model written once in each weight format: ``{format: path}``."""
    folder = tmp_path_factory.mktemp("gguf")
    paths = {}
    for weight_format in GGUF_WEIGHT_FORMATS:
        paths[weight_format] = folder / f"tiny-{weight_format}.gguf"
        save_gguf(model, paths[weight_format], weight_format)
    return paths


def linear_of(model, layer: int, hf_name: str):
    return dict(model.named_linears())[f"model.layers.{layer}.{hf_name}"]


# ---------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("weight_format", GGUF_WEIGHT_FORMATS)
def test_round_trip_gives_identical_logits(model, saved, weight_format):
    loaded = bn.load_gguf(saved[weight_format])
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded(IDS), model(IDS))
    for (name, ours), (_, theirs) in zip(model.named_linears(), loaded.named_linears(), strict=True):
        np.testing.assert_array_equal(bn.unpack(theirs.weight).codes, bn.unpack(ours.weight).codes, err_msg=name)


@pytest.mark.parametrize("head_dtype", ["f16", "bf16"])
@pytest.mark.parametrize("weight_format", ["tq2_0", "i2_s"])
def test_untied_head_and_half_precision_tables_round_trip(tmp_path, head_dtype, weight_format):
    model = tiny_model(tied=False, head_dtype=head_dtype, seed=3)
    save_gguf(model, tmp_path / "m.gguf", weight_format)
    loaded = bn.load_gguf(tmp_path / "m.gguf")
    assert not loaded.tied and loaded.lm_head.dtype == head_dtype
    np.testing.assert_array_equal(loaded(IDS), model(IDS))


def test_config_survives_the_round_trip(model, saved):
    loaded = bn.load_gguf(saved["tq1_0"]).config
    c = model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert getattr(loaded, key) == getattr(c, key), key
    assert np.float32(loaded.rms_norm_eps) == np.float32(c.rms_norm_eps)


def test_scales_fp16_cannot_hold_are_rounded_by_tq_and_kept_by_i2_s(tmp_path):
    model = tiny_model(fp16_scales=False, seed=5)
    for weight_format in GGUF_WEIGHT_FORMATS:
        save_gguf(model, tmp_path / f"{weight_format}.gguf", weight_format)
        loaded = bn.load_gguf(tmp_path / f"{weight_format}.gguf")
        for (_, ours), (_, theirs) in zip(model.named_linears(), loaded.named_linears(), strict=True):
            expected = ours.weight.scale if weight_format == "i2_s" else np.float16(ours.weight.scale)
            assert np.float32(theirs.weight.scale) == np.float32(expected)
    np.testing.assert_array_equal(bn.load_gguf(tmp_path / "i2_s.gguf")(IDS), model(IDS))


def test_load_pretrained_accepts_gguf(model, saved):
    np.testing.assert_array_equal(bn.load_pretrained(saved["tq2_0"])(IDS), model(IDS))
    np.testing.assert_array_equal(bn.load_pretrained(str(saved["i2_s"]))(IDS), model(IDS))


# ---------------------------------------------------------------------------------------
# The files as llama.cpp and gguf see them


@pytest.mark.parametrize("weight_format", ["tq2_0", "tq1_0"])
def test_tq_files_follow_the_engines_layout(model, saved, weight_format):
    reader = gguf.GGUFReader(saved[weight_format])
    arch = reader.get_field("general.architecture").contents()
    assert arch == "bitnet-b1.58"  # 2B4T's relu2 network: bitnet.cpp's name (llama.cpp has no relu2 BitNet graph)
    c = model.config
    expected_keys = {
        f"{arch}.block_count": c.num_hidden_layers, f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.feed_forward_length": c.intermediate_size, f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads, f"{arch}.context_length": c.max_position_embeddings,
        f"{arch}.rope.dimension_count": c.head_dim, f"{arch}.vocab_size": c.vocab_size,
    }
    for key, value in expected_keys.items():
        assert reader.get_field(key).contents() == value, key
    assert reader.get_field(f"{arch}.rope.freq_base").contents() == pytest.approx(c.rope_theta)
    assert reader.get_field(f"{arch}.attention.layer_norm_rms_epsilon").contents() == pytest.approx(c.rms_norm_eps)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.BITNET]}
    names = {t.name for t in reader.tensors}
    assert {n.removesuffix(".weight") for n in names} == {
        a.format(bid=i) for a in allowed for i in range(c.num_hidden_layers)}
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType[weight_format.upper()]
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("weight_format", ["tq2_0", "tq1_0"])
def test_tq_payloads_dequantize_with_gguf_to_the_weights(model, saved, weight_format):
    reader = gguf.GGUFReader(saved[weight_format])
    tensors = {t.name: t for t in reader.tensors}
    for layer, hf_name, name in ((0, "self_attn.q_proj", "attn_q"), (1, "mlp.down_proj", "ffn_down")):
        tensor = tensors[f"blk.{layer}.{name}.weight"]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        t = bn.unpack(linear_of(model, layer, hf_name).weight)
        np.testing.assert_array_equal(values, t.codes * np.float32(np.float16(t.scale)))
        # And the payload is what gguf's own quantizer writes for those weights.
        np.testing.assert_array_equal(gguf.quants.quantize(values, tensor.tensor_type), tensor.data)


def test_i2_s_payload_has_bitnet_cpp_layout_and_type_36(model, saved):
    # gguf's own reader stops at the type id it does not know: exactly why GGUFFile exists.
    with pytest.raises(ValueError):
        gguf.GGUFReader(saved["i2_s"])
    file = GGUFFile(saved["i2_s"])
    assert file.value("general.file_type", (4,)) == 40
    tensor = file.tensors["blk.0.attn_k.weight"]
    t = bn.unpack(linear_of(model, 0, "self_attn.k_proj").weight)
    assert tensor.type_id == 36 and tensor.shape == t.codes.shape
    n = t.codes.size
    assert tensor.data.size == n // 4 + 32
    # x86 I2_S: blocks of 128 weights in 32 bytes; byte j holds j, j+32, j+64, j+96 from bit 7 down.
    flat = (t.codes.reshape(-1, 4, 32) + 1).astype(np.uint8)
    expected = flat[:, 0] << 6 | flat[:, 1] << 4 | flat[:, 2] << 2 | flat[:, 3]
    np.testing.assert_array_equal(tensor.data[: n // 4], expected.reshape(-1))
    assert tensor.data[n // 4 : n // 4 + 4].view(np.float32)[0] == np.float32(t.scale)


# ---------------------------------------------------------------------------------------
# Files written by other converters


def _ternary_types(kind):
    def projection(codes, scale):
        return [("weight", bn.pack(TernaryTensor(codes, scale.reshape(())), kind).data,
                 gguf.GGMLQuantizationType[kind.upper()])]
    return projection


def _float_codes_times_scale(codes, scale):
    # bitnet.cpp's converter: weight_quant() output (codes * s) stored as F16.
    return [("weight", (codes * scale).astype(np.float16), None)]


def _codes_with_scale_tensor(codes, scale):
    # llama.cpp's layout for 2B4T-style weights: ternary values plus an optional blk.N.*.scale multiplier.
    return [("weight", codes.astype(np.float32), None), ("scale", np.array([scale], np.float32), None)]


def as_silu(model):
    """The same weights run as llama.cpp's ``bitnet`` graph does: SiLU-gated MLP (1bitLLM)."""
    import copy

    silu = copy.deepcopy(model)
    silu.config.hidden_act = "silu"
    for layer in silu.layers:
        layer.mlp.activation = "silu"
    return silu


@pytest.mark.parametrize("arch", ["bitnet", "bitnet-b1.58", "bitnet-25"])
@pytest.mark.parametrize("projection", [_ternary_types("tq2_0"), _ternary_types("tq1_0"), _float_codes_times_scale,
                                        _codes_with_scale_tensor], ids=["tq2_0", "tq1_0", "f16", "f32+scale"])
def test_files_of_other_converters_load_as_the_network_their_name_means(model, tmp_path, projection, arch):
    """bitnet.cpp's 2B4T names run relu2; llama.cpp's ``bitnet`` is the SiLU-gated 1bitLLM graph."""
    write_foreign_gguf(tmp_path / "other.gguf", model, projection, arch=arch)
    loaded = bn.load_gguf(tmp_path / "other.gguf")
    expected = as_silu(model) if arch == "bitnet" else model
    assert loaded.config.hidden_act == expected.config.hidden_act
    np.testing.assert_array_equal(loaded(IDS), expected(IDS))


def _quantized_table(table, qtype):
    try:
        return gguf.quants.quantize(table, qtype)
    except NotImplementedError:
        # gguf can dequantize Q6_K but not quantize it: random blocks whose scale d (the
        # last two bytes of a Q6_K block) is small and finite stand in for a real table.
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = np.random.default_rng(0).integers(0, 256, (table.shape[0], table.shape[1] // block, size), np.uint8)
        data[..., -2:] = np.array([0.01], np.float16).view(np.uint8)
        return data.reshape(table.shape[0], -1)


@pytest.mark.parametrize("kind", ["Q8_0", "Q6_K", "Q4_0", "BF16", "F16"])
def test_embeddings_in_common_types_are_dequantized_with_gguf(model, tmp_path, kind):
    qtype = gguf.GGMLQuantizationType[kind]
    table = _quantized_table(model.embed_tokens.float_weights(), qtype)
    write_foreign_gguf(tmp_path / "q.gguf", model, _ternary_types("tq2_0"), lambda _: (table, qtype))
    loaded = bn.load_gguf(tmp_path / "q.gguf")
    np.testing.assert_array_equal(loaded.embed_tokens.float_weights(), gguf.quants.dequantize(table, qtype))
    assert np.isfinite(loaded(IDS)).all()


def test_tq_scales_per_tensor_per_row_and_per_block():
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 2, (4, 512)).astype(np.int8)
    codes[1, :256] = 0  # an all-zero block: ggml writes d = 0 for it, which says nothing of the scale

    def tensor_with(d):
        data = bn.pack(TernaryTensor(codes, np.float32(1.0).reshape(())), "tq2_0").data.copy()
        blocks = data.reshape(4, 2, 66)
        blocks[..., 64:] = np.asarray(d, np.float16).reshape(4, 2, 1).view(np.uint8)
        return GGUFTensor("w", 35, (4, 512), data.reshape(-1))

    d = np.full((4, 2), 0.5)
    d[1, 0] = 0
    uniform = read_ternary(tensor_with(d))
    assert uniform.granularity == "tensor" and uniform.scale == np.float32(0.5)
    per_row = read_ternary(tensor_with(d * np.array([[1], [2], [3], [4]])))
    assert per_row.granularity == "channel"
    np.testing.assert_array_equal(per_row.scale.reshape(-1), [0.5, 1.0, 1.5, 2.0])
    d[2, 1] = 0.25
    per_block = read_ternary(tensor_with(d))
    assert per_block.granularity == "group" and per_block.group_size == 256
    np.testing.assert_array_equal(per_block.scale, d.astype(np.float32))
    np.testing.assert_array_equal(bn.unpack(per_block).codes, codes)


# ---------------------------------------------------------------------------------------
# Tokenizer


SAMPLES = ["Hello world!", "The quick brown fox jumps over 1234567 lazy dogs.", "  two  spaces\tand\ttabs\n\nnewlines",
           "Émile mange des crêpes à Zürich", "emoji 🦙🚀 and 中文字符", "it's they're we'll I'd", "x" * 50, ""]


@pytest.mark.parametrize("llama3", [True, False], ids=["llama-bpe", "gpt-2"])
def test_tokenizer_round_trips_through_gguf_metadata(tmp_path, llama3):
    tokenizer = train_tokenizer(llama3=llama3)
    model = tiny_model(vocab=tokenizer.get_vocab_size())
    save_gguf(model, tmp_path / "t.gguf", "i2_s", tokenizer=tokenizer)
    loaded = bn.load_gguf_tokenizer(tmp_path / "t.gguf")
    reader = GGUFFile(tmp_path / "t.gguf")
    assert reader.value("tokenizer.ggml.model", (8,)) == "gpt2"
    assert reader.value("tokenizer.ggml.pre", (8,)) == ("llama-bpe" if llama3 else "gpt-2")
    for text in SAMPLES + [f"{BOS}special {EOS} tokens"]:
        assert loaded.encode(text).ids == tokenizer.encode(text).ids, text
        assert loaded.decode(loaded.encode(text).ids, skip_special_tokens=True) == \
            tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=True)
    assert loaded.decode(loaded.encode(SAMPLES[4]).ids, skip_special_tokens=True) == SAMPLES[4]
    assert loaded.encode("hi").ids[0] == (0 if llama3 else loaded.encode("hi").ids[0])


def test_file_without_tokenizer_gives_none(saved):
    assert bn.load_gguf_tokenizer(saved["tq2_0"]) is None


def test_unknown_tokenizer_kind_is_refused_clearly():
    with pytest.raises(bn.GGUFError, match="not supported"):
        build_tokenizer("t5", None, ["a", "b"], [1, 1], [])


def test_cli_generate_runs_on_a_gguf_file(tmp_path):
    import subprocess
    import sys

    tokenizer = train_tokenizer()
    save_gguf(tiny_model(vocab=tokenizer.get_vocab_size()), tmp_path / "m.gguf", "tq2_0", tokenizer=tokenizer)
    from bitnet import cli

    if "generate" not in cli.build_parser().format_help():
        pytest.skip("the CLI has no generate command yet")
    result = subprocess.run([sys.executable, "-m", "bitnet", "generate", str(tmp_path / "m.gguf"), "--prompt",
                             "The quick brown", "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


# ---------------------------------------------------------------------------------------
# Errors


def test_missing_and_foreign_files_raise_library_errors(tmp_path):
    with pytest.raises(bn.CheckpointNotFoundError):
        bn.load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "text.gguf").write_text("hello, this is not a model")
    for name in ("empty.gguf", "text.gguf"):
        with pytest.raises(bn.GGUFError, match=name):
            bn.load_gguf(tmp_path / name)


@pytest.mark.parametrize("arch, match", [("gpt2", "'gpt2' is not a ternary model"),
                                         ("llama", "float Llama, not a ternary model")])
def test_other_architecture_is_refused(tmp_path, arch, match):
    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), arch)
    writer.add_block_count(1)
    writer.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(bn.GGUFError, match=match):
        bn.load_gguf(tmp_path / "other.gguf")


# ---------------------------------------------------------------------------------------
# Families: the architecture name says which network a file holds


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("weight_format", GGUF_WEIGHT_FORMATS)
def test_each_family_round_trips_under_its_architecture_name(tmp_path, family, weight_format):
    model = tiny_model(family=family, seed=3, tied=family != "llama")
    save_gguf(model, tmp_path / "m.gguf", weight_format)
    string = gguf.GGUFValueType.STRING  # our reader: gguf's own does not know I2_S
    assert GGUFFile(tmp_path / "m.gguf").value("general.architecture", (string,)) == ARCHITECTURE_OF[family]
    loaded = bn.load_gguf(tmp_path / "m.gguf")
    assert (loaded.config.hidden_act, loaded.config.sub_norms) == (model.config.hidden_act, model.config.sub_norms)
    np.testing.assert_array_equal(loaded(IDS), model(IDS))


def llama_cpp_permute(weights, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, as written there: q/k rows for the interleaved rope."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def test_llama_files_store_q_and_k_rows_permuted_like_llama_cpp(tmp_path):
    model = tiny_model(family="llama", seed=4)
    save_gguf(model, tmp_path / "m.gguf", "tq2_0")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    c = model.config
    for hf, name, heads in (("self_attn.q_proj", "attn_q", c.num_attention_heads),
                            ("self_attn.k_proj", "attn_k", c.num_key_value_heads),
                            ("self_attn.v_proj", "attn_v", None)):
        codes = bn.unpack(linear_of(model, 0, hf).weight).codes.astype(np.float32)
        expected = codes if heads is None else llama_cpp_permute(codes, heads)
        stored = gguf.quants.dequantize(tensors[f"blk.0.{name}.weight"].data, gguf.GGMLQuantizationType.TQ2_0)
        np.testing.assert_array_equal(np.sign(stored.reshape(codes.shape)), expected, err_msg=hf)


@pytest.mark.parametrize("family, relabel, match", [("2b4t", "llama", "tensors include them"),
                                                    ("llama", "bitnet", "tensors lack them"),
                                                    ("llama", "bitnet-25", "tensors lack them")])
def test_a_file_mislabeled_for_its_tensors_is_refused(tmp_path, monkeypatch, family, relabel, match):
    model = tiny_model(family=family, seed=5)
    monkeypatch.setattr(bn.io.gguf.gguf_arch, "architecture_for", lambda config: relabel)  # a converter's mistake
    save_gguf(model, tmp_path / "m.gguf", "tq2_0")
    assert gguf.GGUFReader(tmp_path / "m.gguf").get_field("general.architecture").contents() == relabel
    with pytest.raises(bn.GGUFError, match=match):
        bn.load_gguf(tmp_path / "m.gguf")


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def llama_cpp_rope_factors(head_dim, theta, scaling):
    """convert_hf_to_gguf.py's rope_freqs for a "llama3" rope, as written there (float64 here)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors)


@pytest.mark.parametrize("weight_format", ["tq2_0", "i2_s"])
def test_llama3_rope_is_written_as_llama_cpp_rope_freqs_and_read_back(tmp_path, weight_format):
    model = tiny_model(family="llama", seed=6, heads=2, kv_heads=1, rope=LLAMA3_ROPE)  # head_dim 128
    save_gguf(model, tmp_path / "m.gguf", weight_format)
    c = model.config
    stored = GGUFFile(tmp_path / "m.gguf").tensors["rope_freqs.weight"].data.view(np.float32)
    expected = llama_cpp_rope_factors(c.head_dim, c.rope_theta, LLAMA3_ROPE)
    assert 1 < len(set(expected)) and expected.min() == 1 and expected.max() == 8  # all three regimes
    np.testing.assert_allclose(stored, expected, rtol=1e-6)
    loaded = bn.load_gguf(tmp_path / "m.gguf")
    assert loaded.config.rope_scaling["rope_type"] == "freq_factors"
    ids = np.arange(80) % c.vocab_size  # past original_max_position_embeddings
    np.testing.assert_allclose(loaded(ids), model(ids), rtol=0, atol=1e-4 * np.ptp(model(ids)))
    plain = tiny_model(family="llama", seed=6, heads=2, kv_heads=1)
    assert not np.allclose(plain(ids), model(ids), atol=1e-2 * np.ptp(model(ids)))  # the scaling matters here
    save_gguf(loaded, tmp_path / "again.gguf", weight_format)  # GGUF to GGUF keeps the divisors bit for bit
    again = GGUFFile(tmp_path / "again.gguf").tensors["rope_freqs.weight"].data.view(np.float32)
    np.testing.assert_array_equal(again, stored)
    with pytest.raises(bn.ConfigError, match="rope_freqs tensor, which config.json cannot express"):
        bn.save_pretrained(loaded, tmp_path / "hf")


def test_linear_rope_scaling_round_trips_as_llama_cpp_metadata(tmp_path):
    model = tiny_model(family="1bitllm", seed=7, rope={"rope_type": "linear", "factor": 2.5})
    save_gguf(model, tmp_path / "m.gguf", "tq2_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.get_field("bitnet.rope.scaling.type").contents() == "linear"
    assert reader.get_field("bitnet.rope.scaling.factor").contents() == 2.5
    loaded = bn.load_gguf(tmp_path / "m.gguf")
    assert loaded.config.rope_scaling == {"rope_type": "linear", "factor": 2.5}
    np.testing.assert_array_equal(loaded(IDS), model(IDS))


def test_rope_freqs_only_where_llama_cpp_reads_them_and_only_valid_ones(tmp_path):
    with pytest.raises(bn.GGUFError, match="'bitnet' graph does not read"):
        save_gguf(tiny_model(family="1bitllm", rope=LLAMA3_ROPE), tmp_path / "s.gguf", "tq2_0")
    model = tiny_model(family="llama", heads=2, kv_heads=1)
    for bad in ([1.0] * 63, [1.0] * 63 + [0.0], [1.0] * 63 + [float("nan")], [-2.0] * 64):
        model.config.rope_scaling = {"rope_type": "freq_factors", "freq_factors": bad}
        with pytest.raises(bn.ConfigError, match="64 finite positive numbers"):
            save_gguf(model, tmp_path / "b.gguf", "tq2_0")
    model.config.rope_scaling = {"rope_type": "freq_factors", "freq_factors": [2.0] * 64}
    save_gguf(model, tmp_path / "ok.gguf", "tq2_0")
    data = bytearray((tmp_path / "ok.gguf").read_bytes())
    tensor = {t.name: t for t in gguf.GGUFReader(tmp_path / "ok.gguf").tensors}["rope_freqs.weight"]
    data[tensor.data_offset:tensor.data_offset + 4] = np.float32(-1).tobytes()
    (tmp_path / "bad.gguf").write_bytes(data)
    with pytest.raises(bn.GGUFError, match="rope_freqs.weight: rope freq_factors must be"):
        bn.load_gguf(tmp_path / "bad.gguf")


def test_tokenizer_arrays_are_written_even_when_empty(tmp_path):
    """gguf's writer drops an empty ``merges``; llama.cpp then refuses the file."""
    vocab = {f"w{i}": i for i in range(48)}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    save_gguf(tiny_model(), tmp_path / "m.gguf", "tq2_0", tokenizer=tokenizer)
    field = gguf.GGUFReader(tmp_path / "m.gguf").get_field("tokenizer.ggml.merges")
    assert field is not None and field.contents() == []
    assert bn.load_gguf_tokenizer(tmp_path / "m.gguf").get_vocab_size() == 48


@pytest.mark.parametrize("weight_format", GGUF_WEIGHT_FORMATS)
def test_every_truncation_of_the_header_and_some_of_the_data_raise(saved, tmp_path, weight_format):
    data = saved[weight_format].read_bytes()
    target = tmp_path / "cut.gguf"
    for length in list(range(0, 4096, 7)) + list(range(4096, len(data), 997)):
        target.write_bytes(data[:length])
        with pytest.raises(bn.GGUFError):
            bn.load_gguf(target)


def test_models_gguf_cannot_hold_are_refused(tmp_path):
    narrow = tiny_model(hidden=128, intermediate=128, heads=2, kv_heads=1)
    with pytest.raises(bn.GGUFError, match="multiple of 256"):
        save_gguf(narrow, tmp_path / "n.gguf", "tq2_0")
    save_gguf(narrow, tmp_path / "n.gguf", "i2_s")
    np.testing.assert_array_equal(bn.load_gguf(tmp_path / "n.gguf")(IDS), narrow(IDS))
    with pytest.raises(bn.GGUFError, match="unknown GGUF weight format"):
        save_gguf(narrow, tmp_path / "x.gguf", "q4_0")
    per_channel = tiny_model(seed=2, granularity="channel")
    with pytest.raises(bn.GGUFError, match="i2_s"):
        save_gguf(per_channel, tmp_path / "c.gguf", "i2_s")
    save_gguf(per_channel, tmp_path / "c.gguf", "tq2_0")
    loaded = bn.load_gguf(tmp_path / "c.gguf")
    assert linear_of(loaded, 0, "mlp.up_proj").weight.granularity == "channel"
    np.testing.assert_array_equal(loaded(IDS), per_channel(IDS))


def test_metadata_that_disagrees_with_the_tensors_is_refused(model, tmp_path):
    write_foreign_gguf(tmp_path / "ok.gguf", model, _ternary_types("tq2_0"))
    data = bytearray((tmp_path / "ok.gguf").read_bytes())
    key = b"bitnet.block_count"
    at = data.index(key) + len(key) + 4  # the uint32 value after the key and its type
    data[at:at + 4] = np.uint32(1).tobytes()
    (tmp_path / "fewer.gguf").write_bytes(bytes(data))
    with pytest.raises(bn.GGUFError, match="not part of a 1-layer"):
        bn.load_gguf(tmp_path / "fewer.gguf")
    data[at:at + 4] = np.uint32(3).tobytes()
    (tmp_path / "more.gguf").write_bytes(bytes(data))
    with pytest.raises(bn.GGUFError, match="blk.2.attn_q.weight' is missing"):
        bn.load_gguf(tmp_path / "more.gguf")


def test_block_scales_varying_within_rows_are_refused_clearly(model, tmp_path):
    def projection(codes, scale):
        data = bn.pack(TernaryTensor(codes, scale.reshape(())), "tq2_0").data.copy()
        blocks = data.reshape(codes.shape[0], -1, 66)
        if blocks.shape[1] > 1:  # a different d for the second block of every row
            blocks[:, 1, 64:] = np.array([scale * 2], np.float16).view(np.uint8)
        return [("weight", data, gguf.GGMLQuantizationType.TQ2_0)]

    write_foreign_gguf(tmp_path / "g.gguf", model, projection)
    with pytest.raises(bn.GGUFError, match="differ within rows"):
        bn.load_gguf(tmp_path / "g.gguf")


def test_unknown_head_dtype_is_refused_before_reading(saved):
    with pytest.raises(bn.InvalidValueError, match="head_dtype"):
        bn.load_gguf(saved["tq2_0"], head_dtype="f64")


def test_projections_of_other_types_are_refused_not_misread(model, tmp_path):
    def projection(codes, scale):
        values = (codes * scale).astype(np.float32)
        return [("weight", gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                 gguf.GGMLQuantizationType.Q8_0)]

    write_foreign_gguf(tmp_path / "q8.gguf", model, projection)
    with pytest.raises(bn.GGUFError, match="must be TQ1_0, TQ2_0, I2_S"):
        bn.load_gguf(tmp_path / "q8.gguf")


def test_token_ids_outside_the_vocabulary_are_refused_before_writing(tmp_path):
    model = tiny_model()
    model.config.bos_token_id = model.config.vocab_size  # e.g. Llama 3's default 128000 on a small vocabulary
    with pytest.raises(bn.GGUFError, match="bos_token_id 48 is not a token id of the 48-token vocabulary"):
        save_gguf(model, tmp_path / "m.gguf", "tq2_0")
    model.config.bos_token_id, model.config.eos_token_id = None, [1, 99]
    with pytest.raises(bn.GGUFError, match="eos_token_id 99"):
        save_gguf(model, tmp_path / "m.gguf", "tq2_0")
    assert list(tmp_path.iterdir()) == []

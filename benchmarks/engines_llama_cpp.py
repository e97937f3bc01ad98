"""Run the GGUF files bitnet writes in upstream llama.cpp and compare its logits with bitnet's.

    python -m benchmarks.engines_llama_cpp [OUT_DIR]     (from the repository root)

For each family (2B4T, 1bitLLM, Llama ternary: small random models, plus the bundled model)
and each weight format of :func:`bitnet.save_gguf`, the file is written, loaded with
llama.cpp through ``llama_cpp`` (llama-cpp-python) and run on a fixed sequence of token ids;
the logits of every position are compared with bitnet's on the same file
(:func:`bitnet.load_gguf`). Two bitnet references:

* ``bitnet``: the library's forward pass, activations quantized per token (BitNet b1.58);
* ``Q8_K``: the same pass with every BitLinear's activations quantized as llama.cpp's TQ
  kernels do (one scale per 256 values, ``benchmarks/q8k_activations.py``). A correct file
  matches this one up to float rounding; the gap to ``bitnet`` is the activation rounding.

Figures: max |llama.cpp - reference| over all positions and vocabulary, as % of the
reference's logit range (max - min); "argmax" is the number of positions whose top token
agrees. llama.cpp runs with an f32 KV cache, so that f16 rounding of keys/values does not add
to the difference. With an f16/bf16 table ggml also rounds the head's input to that type, and
a tiny difference (1e-6 relative) can flip one Q8_K rounding step and move these random
models' logits by 0.1-0.5%: a gap of that size in the Q8_K column is not a wrong file (a
wrong q/k row order gives about 9%, the bitnet-b1.58 SiLU/relu2 mix-up far more).

llama.cpp is not a dependency of bitnet. The peer used (llama-cpp-python 0.3.36, which
vendors ggml-org/llama.cpp@0c1e57098, ggml 0.25.3), built from source on Linux x86-64::

    python3 -m venv /work/peers/venv && . /work/peers/venv/bin/activate
    pip install numpy
    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" MAKEFLAGS=-j2 CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        pip install ./llama_cpp_python-0.3.36 --no-binary :all: -v
    pip install numba gguf tokenizers safetensors ml_dtypes && pip install --no-deps -e /path/to/bitnet
"""

from __future__ import annotations

import ctypes
import sys
import tempfile
from pathlib import Path

import numpy as np

import bitnet as bn
from bitnet.choices import GGUF_WEIGHT_FORMATS
from bitnet.io.gguf import save_gguf
from bitnet.io.gguf_arch import architecture_for
from bitnet.nn import BitLinear
from bitnet.quant import TernaryTensor

from .q8k_activations import logits_with, per_token, q8_k

FAMILIES = {
    "2B4T": dict(model_type="bitnet", hidden_act="relu2", sub_norms=True),
    "1bitLLM": dict(model_type="llama", hidden_act="silu", sub_norms=True),
    "Llama ternary": dict(model_type="llama", hidden_act="silu", sub_norms=False),
}
N_TOKENS = 16
GGML_TYPE_F32 = 0
GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT


def random_model(family: str, vocab: int, head_dtype: str = "f32", seed: int = 0) -> bn.BitNetForCausalLM:
    """A small random model of ``family``: TQ-compatible widths, fp16-exact scales, random norm gains."""
    rng = np.random.default_rng(seed)
    config = bn.BitNetConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=256, bos_token_id=None, eos_token_id=0,
        **FAMILIES[family])
    weights: dict[str, object] = {}
    for i in range(config.num_hidden_layers):
        for name, shape in config.linear_shapes().items():
            codes = rng.integers(-1, 2, shape).astype(np.int8)
            scale = np.float32(np.float16(rng.uniform(0.5, 1.5) / np.sqrt(shape[1])))
            weights[f"model.layers.{i}.{name}"] = BitLinear(bn.pack(TernaryTensor(codes, scale), "i2"))
        for name, size in config.norm_shapes().items():
            weights[f"model.layers.{i}.{name}.weight"] = rng.uniform(0.5, 1.5, size).astype(np.float32)
    weights["model.norm.weight"] = rng.uniform(0.5, 1.5, config.hidden_size).astype(np.float32)
    weights["model.embed_tokens.weight"] = rng.standard_normal((vocab, config.hidden_size)).astype(np.float32)
    return bn.BitNetForCausalLM.from_weights(config, weights, head_dtype)


class LlamaCpp:
    """llama.cpp through llama-cpp-python, with its error log kept for the report."""

    def __init__(self):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.errors: list[str] = []

        @llama_cpp.llama_log_callback
        def log(level, text, user_data):
            if level == GGML_LOG_LEVEL_ERROR:
                self.errors.append(text.decode("utf-8", "replace").strip())

        self._log = log  # keep the callback alive
        llama_cpp.llama_log_set(log, ctypes.c_void_p(0))

    def logits(self, path: Path, ids: list[int]) -> tuple[np.ndarray | None, str]:
        """Logits of every position, or None and llama.cpp's first error message."""
        self.errors.clear()
        try:
            llm = self.llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
                                       type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
        except ValueError as exc:
            return None, (self.errors[0] if self.errors else str(exc)).replace(str(path), path.name)
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], np.float64)
        llm.close()
        return logits, ""


def compare(engine: LlamaCpp, path: Path, ids: list[int]) -> dict[str, object]:
    theirs, error = engine.logits(path, ids)
    if theirs is None:
        return {"loads": "no", "error": error}
    model = bn.load_gguf(path)
    row: dict[str, object] = {"loads": "yes"}
    for label, quantize in (("bitnet", per_token), ("Q8_K", q8_k)):
        ours = logits_with(model, quantize, [ids])[0]
        span = ours.max() - ours.min()
        agree = int((ours.argmax(axis=1) == theirs.argmax(axis=1)).sum())
        row[label] = f"{100 * np.abs(theirs - ours).max() / span:.2g}%  {agree}/{len(ids)}"
    return row


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="engines_"))
    out.mkdir(parents=True, exist_ok=True)
    engine = LlamaCpp()
    tokenizer = bn.load_tokenizer()
    vocab = tokenizer.get_vocab_size()
    random_ids = np.random.default_rng(1).integers(0, vocab, N_TOKENS).tolist()
    text = "def main(argv=None):\n    parser = argparse.ArgumentParser(description="
    bundled_ids = tokenizer.encode(text).ids[:N_TOKENS]

    cases = []  # (family, format, table dtype, model, ids)
    for family in FAMILIES:
        model = random_model(family, vocab)
        cases += [(family, fmt, "f32", model, random_ids) for fmt in GGUF_WEIGHT_FORMATS]
    for dtype in ("f16", "bf16"):
        cases.append(("1bitLLM", "tq2_0", dtype, random_model("1bitLLM", vocab, dtype), random_ids))
        cases.append(("Llama ternary", "tq2_0", dtype, random_model("Llama ternary", vocab, dtype), random_ids))
    bundled = bn.load_pretrained()
    cases += [("bundled (2B4T)", fmt, bundled.embed_tokens.dtype, bundled, bundled_ids) for fmt in GGUF_WEIGHT_FORMATS]

    header = f"{'family':<15} {'format':<6} {'table':<5} {'architecture':<13} {'loads':<5} " \
             f"{'vs bitnet: diff, argmax':<24} {'vs Q8_K: diff, argmax':<22}"
    print(header)
    print("-" * len(header))
    refusals = {}
    for family, fmt, dtype, model, ids in cases:
        path = out / f"{family.split()[0].lower()}-{fmt}-{dtype}.gguf"
        save_gguf(model, path, fmt, tokenizer=tokenizer)
        row = compare(engine, path, ids)
        arch = architecture_for(model.config)
        print(f"{family:<15} {fmt:<6} {dtype:<5} {arch:<13} {row['loads']:<5} "
              f"{row.get('bitnet', '-'):<24} {row.get('Q8_K', '-'):<22}")
        if row["loads"] == "no":
            refusals.setdefault(row["error"], []).append(path.name)
    for error, names in refusals.items():
        print(f"\nrefused ({', '.join(names)}):\n  {error}")


if __name__ == "__main__":
    main()

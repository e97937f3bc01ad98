"""How far llama.cpp's TQ1_0/TQ2_0 activation rounding moves a BitNet model's logits.

    python benchmarks/q8k_activations.py [MODEL_DIR]      (default: the bundled model)

llama.cpp multiplies TQ1_0/TQ2_0 weights with activations quantized as Q8_K: one scale per
block of 256 values (``quantize_row_q8_K_ref``: ``iscale = -127 / v``, ``v`` the value of
largest magnitude, ``q = min(127, nearest_int(iscale x))``), where BitNet b1.58 (and
bitnet.cpp's I2_S, and bitnet) quantize per token: ``a = 127 / max|x|``,
``q = clip(round(x a), -128, 127)``. Every BitLinear of the model is run both ways in float64
numpy, with the same ternary weights, and the logits are compared over a few prompts:
the figure is max |difference| / (max - min) of the reference logits.
"""

from __future__ import annotations

import sys

import numpy as np

import bitnet as bn
import bitnet.nn.linear

BLOCK = 256


def per_token(x: np.ndarray) -> np.ndarray:
    a = 127.0 / np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-5)
    return np.clip(np.rint(x * a), -128, 127) / a


def q8_k(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(x.shape[0], -1, BLOCK).astype(np.float32)
    top = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(top == 0, 0, np.float32(-127.0) / top).astype(np.float32)
        q = np.minimum(127, np.rint(iscale * blocks))
        d = np.where(iscale == 0, 0, np.float32(1.0) / iscale)
    return (q * d).reshape(x.shape)


def emulated_matmul(quantize):
    def matmul(x, weight, out=None, device=None):
        t = bn.unpack(weight)
        scale = t.scale.reshape(-1) if t.granularity == "channel" else float(t.scale)
        result = (quantize(x.astype(np.float64)) @ t.codes.T.astype(np.float64)) * scale
        out[...] = result
        return out

    return matmul


def logits_with(model, quantize, prompts):
    original = bitnet.nn.linear.matmul
    bitnet.nn.linear.matmul = emulated_matmul(quantize)
    try:
        return [model.forward(np.array(ids)).astype(np.float64) for ids in prompts]
    finally:
        bitnet.nn.linear.matmul = original


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else None
    model, tokenizer = bn.load_pretrained(path), bn.load_tokenizer(path)
    texts = ["def main(argv=None):\n    parser = argparse.ArgumentParser(", "import os\nimport sys\n\n\nclass ",
             "    for key, value in sorted(items):\n        if value is None:\n            continue\n"]
    prompts = [tokenizer.encode(text).ids for text in texts]
    reference = logits_with(model, per_token, prompts)
    ggml = logits_with(model, q8_k, prompts)
    for text, ref, other in zip(texts, reference, ggml, strict=True):
        span = ref.max() - ref.min()
        worst = np.abs(other - ref).max() / span
        typical = np.median(np.abs(other - ref).max(axis=1) / (ref.max(axis=1) - ref.min(axis=1)))
        print(f"{len(ref):3d} tokens: max |Q8_K - per-token| = {100 * worst:.2f}% of the logit range "
              f"(median over positions {100 * typical:.2f}%) for {text[:30]!r}")


if __name__ == "__main__":
    main()

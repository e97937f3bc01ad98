"""Batch generation on Ray Data (one local Ray instance with 2 CPUs for the module): every row gets what a
local loop of ``model.generate`` gives its prompt, and each actor runs as many Numba threads as it has CPUs."""

from __future__ import annotations

import pytest

import bitnet as bn
from bitnet.distributed import Predictor, generate_batch, generate_dataset

pytest.importorskip("tokenizers")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

PROMPTS = ["def fibonacci(n):", "import numpy as np\n", "class Stack:", "for i in range(10):", "x = "]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return bn.load_pretrained(), bn.load_tokenizer()


def local_loop(model, tokenizer, prompts, max_tokens, **sampling) -> list[str]:
    """The reference: one ``model.generate`` per prompt, the EOS token left out of the text."""
    texts = []
    for prompt in prompts:
        tokens = model.generate(tokenizer.encode(prompt).ids, max_tokens, **sampling)
        texts.append(tokenizer.decode(tokens[:-1] if tokens[-1] in model.config.stop_token_ids else tokens))
    return texts


def test_generate_batch_equals_a_local_loop(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    sampling = dict(temperature=0.7, top_p=0.9, seed=3)
    assert generate_batch(model, tokenizer, PROMPTS, 20, max_batch=2) == local_loop(model, tokenizer, PROMPTS, 20)
    assert generate_batch(model, tokenizer, PROMPTS, 20, **sampling) == local_loop(model, tokenizer, PROMPTS, 20,
                                                                                   **sampling)
    expected = local_loop(model, tokenizer, PROMPTS[:1], 30)[0]
    stop = expected[10:13]
    assert generate_batch(model, tokenizer, PROMPTS[:1], 30, stop=[stop]) == [expected[: expected.find(stop)]]
    with pytest.raises(bn.InvalidValueError, match="prompt 1 .* encodes to no tokens"):
        generate_batch(model, tokenizer, ["x", ""], 5)


def test_ray_dataset_rows_equal_a_local_loop(local_ray, model_and_tokenizer):
    ds = ray.data.from_items([{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])
    rows = generate_dataset(ds, max_tokens=16, concurrency=1, num_cpus=2, batch_size=2, seed=0,
                            temperature=0.5).take_all()
    assert sorted(rows, key=lambda r: r["id"]) == [
        {"prompt": p, "id": i, "generated": text}
        for i, (p, text) in enumerate(zip(PROMPTS, local_loop(*model_and_tokenizer, PROMPTS, 16, seed=0,
                                                              temperature=0.5), strict=True))
    ]


def test_each_actor_runs_as_many_numba_threads_as_it_has_cpus(local_ray):
    @ray.remote
    def threads_in_a_worker() -> tuple[int, int]:
        import numba

        predictor = Predictor(max_tokens=2)
        predictor({"prompt": ["x"]})
        return predictor.threads, numba.get_num_threads()

    for cpus in (1, 2):
        assert ray.get(threads_in_a_worker.options(num_cpus=cpus).remote()) == (cpus, cpus)


def test_a_missing_prompt_column_is_named(local_ray):
    ds = ray.data.from_items([{"text": "x"}])
    with pytest.raises(Exception, match="the dataset has no column 'prompt'"):
        generate_dataset(ds, max_tokens=2).take_all()

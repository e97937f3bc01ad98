"""Batch generation over a dataset, beyond one machine, with Ray Data (the ``[ray]`` extra).

:func:`generate_dataset` maps a :class:`Predictor` over a ``ray.data.Dataset`` of prompts:
Ray starts ``concurrency`` actors, each loads the model once and runs its batches of prompts
through the server's scheduler (continuous batching, so a batch of 16 prompts streams the
weights once per step, not 16 times), with as many Numba threads as Ray gave it CPUs. Each
row gets what :func:`generate_batch` gives locally, which is what ``model.generate`` gives
each prompt. On a cluster the same code runs unchanged: ``ray.init(address="auto")`` (or
``RAY_ADDRESS``) before it, and a model path every node can read.

Nothing here imports Ray: the dataset brings it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import errors
from .choices import DEFAULT_MAX_BATCH
from .io import load_pretrained, load_tokenizer
from .io.detokenize import TextStream
from .models import BitNetForCausalLM
from .models.sampling import Sampler
from .ops import set_num_threads
from .serve.scheduler import Output, Scheduler, Sequence


def generate_batch(
    model: BitNetForCausalLM,
    tokenizer,
    prompts: Iterable[str],
    max_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Iterable[str] = (),
    max_batch: int = DEFAULT_MAX_BATCH,
) -> list[str]:
    """The generated text of each prompt, ``max_batch`` prompts advanced together.

    Each text is ``tokenizer.decode(model.generate(ids, max_tokens, temperature, top_k,
    top_p, seed))`` of that prompt's ids, less an ending EOS token and cut before the first
    of ``stop``: every prompt gets its own sampler with ``seed``, as a loop calling
    ``generate`` would.

    Parameters
    ----------
    model, tokenizer : the model and its ``tokenizers.Tokenizer``.
    prompts : the texts to continue.
    max_tokens : the most tokens to generate for each.
    temperature, top_k, top_p, seed : sampling, as :meth:`bitnet.BitNetForCausalLM.generate`.
    stop : strings that end a text (not included).
    max_batch : prompts generating at once.

    Returns
    -------
    list of str, in the order of ``prompts``.

    Raises
    ------
    InvalidValueError for bad settings or a prompt that encodes to no tokens;
    ContextLengthError for a prompt that leaves no room for ``max_tokens`` in the context.
    """
    scheduler = Scheduler(model, max_batch)
    stop = tuple(stop)
    outputs: list[list[Output]] = []
    for index, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt).ids
        if not ids:
            raise errors.InvalidValueError(f"prompt {index} ({prompt!r:.40}) encodes to no tokens")
        outputs.append([])
        sampler = Sampler(temperature, top_k, top_p, seed)
        scheduler.add(Sequence(ids, max_tokens, sampler, outputs[-1].append, model.config.stop_token_ids,
                               TextStream(tokenizer, stop)))
    while scheduler.busy:
        scheduler.step()
    for sequence_outputs in outputs:
        if sequence_outputs[-1].error is not None:
            raise sequence_outputs[-1].error
    return ["".join(o.text for o in sequence_outputs) for sequence_outputs in outputs]


class Predictor:
    """A Ray Data predictor: loads the model once per actor, then generates for each batch of rows.

    Use it through :func:`generate_dataset`, or directly as
    ``ds.map_batches(Predictor, fn_constructor_kwargs={...}, concurrency=..., num_cpus=...)``.

    Parameters
    ----------
    model_path : HF model directory or .gguf file every worker can read; None: the bundled model.
    column : the column holding the prompts.
    output_column : the column the generated texts go to.
    threads : Numba threads; None: the CPUs Ray assigned to this actor (1 outside Ray).
    **settings : ``max_tokens`` and the keyword arguments of :func:`generate_batch`.

    Raises
    ------
    CheckpointNotFoundError when the model has no tokenizer; what the loaders raise.
    """

    def __init__(self, model_path: str | Path | None = None, column: str = "prompt",
                 output_column: str = "generated", threads: int | None = None, **settings: object) -> None:
        self.threads = assigned_cpus() if threads is None else threads
        set_num_threads(self.threads)  # refuses a bad count now, before the model loads
        self.model = load_pretrained(model_path)
        self.tokenizer = load_tokenizer(model_path)
        if self.tokenizer is None:
            raise errors.CheckpointNotFoundError(f"{model_path} has no tokenizer.json to encode the prompts with")
        self.column, self.output_column, self.settings = column, output_column, settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise errors.InvalidValueError(
                f"the dataset has no column {self.column!r} (it has {sorted(batch)}): name the prompts' column"
            )
        set_num_threads(self.threads)  # Numba's setting is per thread, and Ray may call from a thread of its own
        texts = generate_batch(self.model, self.tokenizer, [str(p) for p in batch[self.column]], **self.settings)
        return {**batch, self.output_column: np.array(texts, dtype=object)}


def assigned_cpus() -> int:
    """The CPUs Ray assigned to the calling worker (at least 1, at most Numba's pool); 1 outside Ray."""
    import numba

    try:
        import ray
    except ImportError:
        return 1
    if not ray.is_initialized():
        return 1
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return max(1, min(int(cpus), numba.config.NUMBA_NUM_THREADS))


def generate_dataset(
    ds,
    model_path: str | Path | None = None,
    *,
    column: str = "prompt",
    output_column: str = "generated",
    max_tokens: int = 64,
    concurrency: int = 1,
    num_cpus: float = 1,
    batch_size: int = 16,
    **settings: object,
):
    """Generate a text for each row of a Ray dataset: the rows with an ``output_column`` added.

    Parameters
    ----------
    ds : a ``ray.data.Dataset`` with a column of prompts.
    model_path : HF model directory or .gguf file every node can read; None: the bundled model.
    column, output_column : the prompts' column and the generated texts' column.
    max_tokens : the most tokens to generate for each prompt.
    concurrency : actors (model copies) generating at once.
    num_cpus : CPUs Ray reserves for each actor; its Numba threads.
    batch_size : rows an actor generates together (batched per step by ``max_batch``).
    **settings : ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``, ``max_batch`` of
        :func:`generate_batch`.

    Returns
    -------
    ray.data.Dataset : lazy, as every Ray Data transformation; ``take_all()``, ``write_parquet(...)``
    or iterating it runs the generation.

    Examples
    --------
    >>> import ray
    >>> from bitnet.distributed import generate_dataset
    >>> ds = ray.data.from_items([{"prompt": "def fib(n):"}, {"prompt": "import os"}])  # doctest: +SKIP
    >>> generate_dataset(ds, max_tokens=32, concurrency=2, num_cpus=2).take_all()  # doctest: +SKIP
    """
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_path": None if model_path is None else str(model_path), "column": column,
                               "output_column": output_column, "max_tokens": max_tokens, **settings},
        concurrency=concurrency,
        num_cpus=num_cpus,
        batch_size=batch_size,
        batch_format="numpy",
    )

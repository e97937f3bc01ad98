"""``bitnet.torch.train``: quantization-aware training of a BitNet b1.58 model on a text corpus.

One process or many: under ``torchrun`` the same code runs with DistributedDataParallel
(gloo on CPUs, nccl on GPUs), each rank taking its rows of the same global batch. Every
step's batch is a function of the seed and the step number, so a run resumed from its
checkpoint continues with exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import errors
from ..io.atomic import replacing
from .config import TrainConfig, learning_rate
from .corpus import END_OF_TEXT, bits_per_byte, read_corpus, token_stream, train_tokenizer
from .export import export_pretrained
from .linear import set_quantization
from .model import build_model

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
RESULT_FILE = "result.json"
MODEL_DIR = "model"


@dataclass
class TrainResult:
    """What a run produced: the losses of its steps, the held-out bits per byte, where the model is."""

    losses: list[float]
    held_out_bpb: float | None
    model_dir: Path | None
    seconds: float
    tokens: int


def batch_rows(step: int, config: TrainConfig, n_tokens: int) -> torch.Tensor:
    """Start offsets of the global batch of ``step``: a function of the seed and the step only."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - config.context - 1, (config.batch_size,), generator=generator)


class _Run:
    """Process-group facts: rank, world size, device."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cpu")
        if self.world > 1:
            import torch.distributed as dist

            if torch.cuda.is_available():
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            self.owns_group = not dist.is_initialized()
            if self.owns_group:
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then destroy the process group this run created.

        A rank that exits while gloo's threads still serve the group aborts the process
        ("terminate called without an active exception").
        """
        self.barrier()
        if self.world > 1 and self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _bf16_default() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def evaluate(model, stream: np.ndarray, n_bytes: int, context: int, batch: int = 16) -> float:
    """Held-out bits per byte of a torch model (float32 forward, eval mode)."""
    was_training = model.training
    model.eval()

    def nll(window: np.ndarray) -> float:
        ids = torch.from_numpy(window).unsqueeze(0)
        logits = model(input_ids=ids[:, :-1]).logits.float()
        return float(F.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))

    with torch.no_grad():
        result = bits_per_byte(nll, stream, n_bytes, context)
    model.train(was_training)
    return result


def _save_checkpoint(path: Path, model, optimizer, step: int, config: TrainConfig) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "config": dataclasses.asdict(config), "rng": torch.get_rng_state()}
    with replacing(path) as (temporary,):
        torch.save(state, temporary)


def _load_checkpoint(path: Path, config: TrainConfig) -> dict:
    try:
        state = torch.load(path, weights_only=True)
        step = int(state["step"])
        saved = state["config"]
    except Exception as exc:  # torch raises many kinds of errors for a damaged file
        raise errors.CheckpointError(
            f"cannot resume from {path}: the checkpoint is corrupt or incomplete ({type(exc).__name__}: {exc}); "
            f"delete the directory to start over"
        ) from None
    changed = {k for k, v in dataclasses.asdict(config).items() if k != "out_dir" and saved.get(k) != v}
    if changed:
        raise errors.CheckpointError(
            f"cannot resume from {path}: it was trained with other settings ({', '.join(sorted(changed))}); "
            f"resume with the same settings or start a new directory"
        )
    return {**state, "step": step}


def _prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    checkpoint = out / CHECKPOINT_FILE
    if resume:
        if not checkpoint.is_file():
            raise errors.CheckpointNotFoundError(f"cannot resume: {checkpoint} does not exist")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise errors.OutputExistsError(
            f"{out} already exists and is not empty: resume it (--resume), overwrite it (--overwrite), "
            f"or choose another directory"
        )
    out.mkdir(parents=True, exist_ok=True)


def _log(out: Path, record: dict) -> None:
    with open(out / LOG_FILE, "a") as log:
        log.write(json.dumps(record) + "\n")


def _truncate_log(out: Path, step: int) -> None:
    """Keep the log lines of steps before ``step`` (a stop may have logged past its checkpoint)."""
    file = out / LOG_FILE
    if file.is_file():
        lines = [line for line in file.read_text().splitlines() if json.loads(line)["step"] < step]
        file.write_text("".join(line + "\n" for line in lines))


def read_log(out_dir: str | Path) -> list[dict]:
    """The records of a run's ``log.jsonl``: one per step (``loss``, ``lr``, ``tokens_per_s``) and per evaluation."""
    return [json.loads(line) for line in (Path(out_dir) / LOG_FILE).read_text().splitlines()]


def train(
    config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
    stop_at: int | None = None, threads: int | None = None,
) -> TrainResult:
    """Train a BitNet b1.58 model (or its float baseline) and export it.

    Parameters
    ----------
    config : the run's settings (:class:`TrainConfig`).
    resume : continue from ``out_dir/checkpoint.pt`` exactly where it stopped.
    overwrite : allow ``out_dir`` to exist and hold files (they are replaced).
    progress : show a tqdm progress bar with the loss and tokens/s.
    stop_at : stop after this step, leaving a checkpoint to resume from (a planned interruption).
    threads : torch's CPU threads (default: torch's choice; 1 per process under torchrun).

    Returns
    -------
    TrainResult. The trained model is exported to ``out_dir/model`` (HF packed layout with
    its tokenizer; float models are saved in float) once the last step is done.

    Raises
    ------
    ConfigError for sizes the formats cannot hold; InvalidValueError for an empty, binary or
    too small corpus; OutputExistsError for a non-empty ``out_dir`` without ``resume`` or
    ``overwrite``; CheckpointError for a corrupt checkpoint or one made with other settings.
    """
    out = Path(config.out_dir)
    model_config = config.model_config()
    if config.batch_size % int(os.environ.get("WORLD_SIZE", "1")):
        raise errors.ConfigError(f"batch_size {config.batch_size} must be a multiple of the number of processes")
    if threads is not None:
        torch.set_num_threads(threads)
    run = _Run()
    if run.main:
        _prepare_out_dir(out, resume, overwrite)
    run.barrier()
    corpus = read_corpus(config.corpus, config.pattern)
    tokenizer_file = out / "tokenizer.json"
    if resume and tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    else:
        tokenizer = train_tokenizer([text for _, text in corpus.train], config.vocab_size)
        if run.main:
            tokenizer.save(str(tokenizer_file))
    if tokenizer.get_vocab_size() != config.vocab_size or tokenizer.token_to_id(END_OF_TEXT) != 0:
        raise errors.InvalidValueError(
            f"the corpus is too small for a vocabulary of {config.vocab_size} tokens (the tokenizer learned "
            f"{tokenizer.get_vocab_size()}): lower vocab_size or add text"
        )
    stream = torch.from_numpy(token_stream(tokenizer, [text for _, text in corpus.train]))
    held_out = token_stream(tokenizer, [text for _, text in corpus.held_out])
    if len(stream) <= config.context + 1:
        raise errors.InvalidValueError(
            f"the corpus has {len(stream)} training tokens, fewer than one context of {config.context}: add text"
        )

    model = build_model(model_config, config.granularity, seed=config.seed)
    if not config.quantize:
        set_quantization(model, 0.0)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim != 2]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.peak_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=config.weight_decay)
    start = 0
    losses: list[float] = []
    if resume:
        state = _load_checkpoint(out / CHECKPOINT_FILE, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        if run.main:
            _truncate_log(out, start)
            losses = [r["loss"] for r in read_log(out) if "loss" in r]
    elif run.main and (out / LOG_FILE).exists():
        (out / LOG_FILE).unlink()

    trained = model
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model)
    if config.compile:
        trained = torch.compile(trained)
    bf16 = _bf16_default() if config.bf16 is None else config.bf16
    local = slice(run.rank, None, run.world)
    offsets = torch.arange(config.context + 1)
    end = config.steps if stop_at is None else min(config.steps, stop_at)
    bar = None
    if progress and run.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True)
    began = time.perf_counter()
    model.train()
    for step in range(start, end):
        tick = time.perf_counter()
        if config.quantize and config.progressive_steps:
            set_quantization(model, min(1.0, (step + 1) / config.progressive_steps))
        lr, weight_decay = learning_rate(step, config)
        optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"] = lr, lr
        optimizer.param_groups[0]["weight_decay"] = weight_decay
        rows = stream[batch_rows(step, config, len(stream))[local, None] + offsets]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and run.device.type == "cpu"):
            logits = trained(input_ids=rows[:, :-1].to(run.device)).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1).to(run.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        value = run.mean(loss.item())
        tokens_per_s = config.batch_size * config.context / (time.perf_counter() - tick)
        if run.main:
            losses.append(value)
            _log(out, {"step": step, "loss": value, "lr": lr, "tokens_per_s": tokens_per_s})
            if bar is not None:
                bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                bar.update(1)
            done = step + 1
            if config.eval_every and done % config.eval_every == 0 and done < config.steps:
                _log(out, {"step": step, "held_out_bpb": evaluate(model, held_out, corpus.held_out_bytes,
                                                                  config.context)})
            if done == end or (config.checkpoint_every and done % config.checkpoint_every == 0):
                _save_checkpoint(out / CHECKPOINT_FILE, model, optimizer, done, config)
        run.barrier()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - began
    tokens = (end - start) * config.batch_size * config.context
    bpb, model_dir = None, None
    if end == config.steps and run.main:
        bpb = evaluate(model, held_out, corpus.held_out_bytes, config.context)
        model_dir = out / MODEL_DIR
        if config.quantize:
            export_pretrained(model, model_dir, tokenizer)
        else:
            model.save_pretrained(model_dir)
            tokenizer.save(str(model_dir / "tokenizer.json"))
        result = {"held_out_bpb": bpb, "held_out_bytes": corpus.held_out_bytes, "train_seconds": seconds,
                  "tokens": tokens, "final_loss": losses[-1] if losses else math.nan,
                  "config": dataclasses.asdict(config)}
        (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        _log(out, {"step": config.steps - 1, "held_out_bpb": bpb})
    run.close()  # every rank waits for the export, then leaves the process group
    return TrainResult(losses, bpb, model_dir, seconds, tokens)

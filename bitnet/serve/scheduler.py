"""Continuous batching: many sequences advanced together, one batched forward pass per step.

A :class:`Scheduler` holds the sequences waiting to start and the ones running (at most
``max_batch``). Each :meth:`Scheduler.step` admits waiting sequences into free slots, then
runs one :meth:`BitNetForCausalLM.forward_batch` over every running sequence: a decoding
sequence feeds its last token, a sequence still reading its prompt feeds the next chunk of
it (at most ``prefill_chunk`` prompt tokens in a step, all sequences together, so a long
prompt delays the running streams by one chunk at a time, not by its whole length). Each
sequence then samples its next token from its own row of logits with its own sampler, and
sequences that end (a stop token or string, ``max_tokens``, cancelled) leave the batch and
give their KV cache back to the arena.

A scheduler is not thread-safe: one thread steps it (see :class:`bitnet.serve.Engine`); only
:meth:`Sequence.cancel` may be called from another thread.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from .. import errors
from ..choices import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK
from ..io.detokenize import TextStream
from ..memory import Arena, default_arena
from ..models import BitNetForCausalLM
from ..models.sampling import Sampler
from ..nn import checks

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH = "stop", "length"  # OpenAI's finish_reason values
CACHE_HEADROOM = 256  # decode positions a new cache has room for before it first doubles


@dataclass(frozen=True)
class Output:
    """What one step added to a sequence.

    Attributes
    ----------
    token : the token generated, or None when the sequence ended without one (an error).
    text : the new text to show ("" while it is held back, or without a tokenizer).
    finish_reason : "stop" (a stop token or string) or "length" (``max_tokens``) on a
        sequence's last output; None while it runs.
    completion_tokens : tokens generated so far.
    error : the exception that ended the sequence, if one did (its last output).
    """

    token: int | None
    text: str
    finish_reason: str | None
    completion_tokens: int
    error: Exception | None = None

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Sequence:
    """One request's generation: its prompt, limits and sampler, and its state in the batch.

    Parameters
    ----------
    prompt : the prompt's token ids (at least one).
    max_tokens : the most tokens to generate (>= 1).
    sampler : picks each token from the sequence's logits.
    emit : called with each :class:`Output`, on the scheduler's thread; it must be quick.
    stop_ids : token ids that end the sequence (the model's EOS); they add no text.
    text : the detokenizer and stop strings of the sequence, or None for token ids only.
    """

    def __init__(
        self,
        prompt: list[int] | np.ndarray,
        max_tokens: int,
        sampler: Sampler,
        emit: Callable[[Output], None],
        stop_ids: Iterable[int] = (),
        text: TextStream | None = None,
    ) -> None:
        self.prompt = prompt  # checked against the model's vocabulary by Scheduler.add
        self.max_tokens = checks.positive_int(max_tokens, "max_tokens")
        self.sampler = sampler
        self.emit = emit
        self.stop_ids = frozenset(stop_ids)
        self.text = text
        self.tokens: list[int] = []
        self.fed = 0  # prompt tokens already in the cache
        self.cache = None
        self.finish_reason: str | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """End the sequence at the next step, without another output (any thread may call this)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        """Whether the sequence has ended (finished, failed or cancelled)."""
        return self.finish_reason is not None or self.cancelled

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def next_input(self, budget: int) -> np.ndarray:
        """The tokens this step feeds: the next chunk of the prompt (at most ``budget``), or the last token."""
        if self.prefilling:
            return self.prompt[self.fed:self.fed + budget]
        return np.array(self.tokens[-1:], np.int64)

    def advance(self, logits: np.ndarray) -> Output:
        """Sample the next token from this sequence's ``logits`` row; the output says whether it ended."""
        token = self.sampler(logits)
        self.tokens.append(token)
        stopped_by_token = token in self.stop_ids
        piece = ""
        if self.text is not None and not stopped_by_token:
            piece = self.text.push(token)
        if stopped_by_token or (self.text is not None and self.text.stopped):
            self.finish_reason = FINISH_STOP
        elif len(self.tokens) == self.max_tokens:
            self.finish_reason = FINISH_LENGTH
        if self.finish_reason is not None and self.text is not None:
            piece += self.text.flush()
        return Output(token, piece, self.finish_reason, len(self.tokens))

    def failed(self, error: Exception) -> Output:
        """The last output of a sequence that ``error`` ended."""
        self.cancel()
        return Output(None, "", None, len(self.tokens), error)


class Scheduler:
    """Advances many :class:`Sequence` objects together, one :meth:`step` at a time.

    Parameters
    ----------
    model : the model every sequence runs on.
    max_batch : the most sequences running at once (>= 1).
    prefill_chunk : the most prompt tokens fed in one step, over all sequences (>= 1).
    arena : where KV caches come from and go back to; the default arena if None.
    max_context : the most positions (prompt plus ``max_tokens``) a sequence may use; None:
        the model's context, which it cannot exceed.

    Raises
    ------
    InvalidValueError for a ``max_batch``, ``prefill_chunk`` or ``max_context`` that is not an
    integer >= 1, or a ``max_context`` above the model's context.
    """

    def __init__(
        self,
        model: BitNetForCausalLM,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        arena: Arena | None = None,
        max_context: int | None = None,
    ) -> None:
        self.model = model
        model_context = model.config.max_position_embeddings
        self.context = model_context if max_context is None else checks.positive_int(max_context, "max_context")
        if self.context > model_context:
            raise errors.InvalidValueError(
                f"max_context {self.context} exceeds the model's context of {model_context} tokens"
            )
        self.max_batch = checks.positive_int(max_batch, "max_batch")
        self.prefill_chunk = checks.positive_int(prefill_chunk, "prefill_chunk")
        self.arena = default_arena() if arena is None else arena
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []

    @property
    def busy(self) -> bool:
        """Whether a step would do anything."""
        return bool(self.waiting or self.running)

    def add(self, sequence: Sequence) -> None:
        """Queue ``sequence`` (checked by :meth:`check`); it starts at the first step with a free slot, in order."""
        self.check(sequence)
        self.waiting.append(sequence)

    def check(self, sequence: Sequence) -> None:
        """Raise unless ``sequence`` can run here; any thread may call this.

        Raises
        ------
        InvalidValueError (or ShapeError, DTypeError) for a prompt that is not a non-empty
        list of token ids of the model's vocabulary; ContextLengthError when the prompt plus
        ``max_tokens`` exceeds :attr:`context`.
        """
        sequence.prompt = checks.checked_ids(sequence.prompt, self.model.config.vocab_size, "prompt")
        if sequence.prompt.size == 0:
            raise errors.InvalidValueError("the prompt is empty: give at least one token id")
        if len(sequence.prompt) + sequence.max_tokens > self.context:
            raise errors.ContextLengthError(
                f"the prompt's {len(sequence.prompt)} tokens plus {sequence.max_tokens} tokens to generate exceed the "
                f"context of {self.context} tokens: shorten the prompt or ask for fewer tokens"
            )

    def step(self) -> list[Sequence]:
        """Admit, run one batched forward pass, emit each running sequence's output; returns those that ended.

        A failure of the forward pass ends every running sequence with an output carrying
        the error; the scheduler itself goes on.
        """
        ended = self._drop_cancelled()
        self._admit()
        if not self.running:
            return ended
        batch = self._batch()
        try:
            logits = self.model.forward_batch([tokens for _, tokens in batch], [s.cache for s, _ in batch])
        except Exception as exc:  # the model failed: these requests end with the error, the server goes on
            log.exception("a batched forward pass failed; ending its %d sequences", len(batch))
            for sequence in self.running:
                self._send(sequence, sequence.failed(exc))
            return ended + self._retire(list(self.running))
        for row, (sequence, tokens) in enumerate(batch):
            if sequence.prefilling:
                sequence.fed += len(tokens)
                if sequence.prefilling:
                    continue  # more of its prompt to read: this row's logits are not for sampling
            output = sequence.advance(logits[row])
            self._send(sequence, output)
        return ended + self._retire([s for s in self.running if s.done])

    def close(self, error: Exception) -> None:
        """End every sequence, waiting or running, with an output carrying ``error``, and free their caches."""
        for sequence in [*self.waiting, *self.running]:
            if not sequence.done:
                self._send(sequence, sequence.failed(error))
        self.waiting.clear()
        self._retire(list(self.running))

    def _batch(self) -> list[tuple[Sequence, np.ndarray]]:
        """Each running sequence with the tokens it feeds this step; prefill shares the step's prompt budget."""
        batch, budget = [], self.prefill_chunk
        for sequence in self.running:
            if not sequence.prefilling:
                batch.append((sequence, sequence.next_input(1)))
            elif budget > 0:
                tokens = sequence.next_input(budget)
                budget -= len(tokens)
                batch.append((sequence, tokens))
        return batch

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            sequence = self.waiting.popleft()
            capacity = len(sequence.prompt) + min(sequence.max_tokens, CACHE_HEADROOM)
            sequence.cache = self.model.new_cache(capacity, arena=self.arena)
            self.running.append(sequence)

    def _drop_cancelled(self) -> list[Sequence]:
        cancelled = [s for s in self.waiting if s.cancelled]
        if cancelled:
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
        return cancelled + self._retire([s for s in self.running if s.cancelled])

    def _retire(self, sequences: list[Sequence]) -> list[Sequence]:
        """Take ``sequences`` out of the batch and give their caches back."""
        for sequence in sequences:
            self.running.remove(sequence)
            sequence.cache.release()
            sequence.cache = None
        return sequences

    @staticmethod
    def _send(sequence: Sequence, output: Output) -> None:
        """Hand ``output`` to the sequence's consumer; a consumer that fails (gone) cancels its sequence."""
        try:
            sequence.emit(output)
        except Exception:  # e.g. the event loop of a disconnected HTTP client has closed
            log.exception("a sequence's consumer failed; cancelling the sequence")
            sequence.cancel()

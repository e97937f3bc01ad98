"""The generation engine of the server: a :class:`Scheduler` stepped on one background thread.

Requests come from any thread (the HTTP handlers' event loop) through :meth:`Engine.submit`,
which checks them at once, so a bad request is refused to its caller, and puts them on a
queue the engine thread takes from between steps. Outputs go back through each request's
``emit`` callback, called on the engine thread. The model runs on that thread only: Numba's
kernels release the GIL, so the event loop keeps serving while a step runs, and no two
threads ever launch kernels at once. The thread that creates the engine (the one that built
the model, as a rule) hands its OpenMP workers back (:func:`bitnet.ops.release_worker_threads`):
left alone, they make every parallel kernel of the engine thread wait for its workers to wake.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable

import numpy as np

from .. import errors
from ..choices import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK
from ..io.detokenize import TextStream
from ..memory import Arena
from ..models import BitNetForCausalLM
from ..models.sampling import Sampler
from ..nn import checks
from ..ops import release_worker_threads, set_num_threads
from .scheduler import Output, Scheduler, Sequence

log = logging.getLogger(__name__)

_STOP = None  # the inbox item that ends the engine thread


class Engine:
    """Continuous batching on a background thread: submit requests from anywhere, get outputs by callback.

    Creating it releases the calling thread's OpenMP workers (:func:`bitnet.release_worker_threads`):
    from then on the engine thread runs the kernels.

    Parameters
    ----------
    model : the model to serve.
    tokenizer : its ``tokenizers.Tokenizer`` for text outputs and stop strings; None: token ids only.
    max_batch : the most requests generating at once.
    max_queue : the most requests waiting for a slot; one more is refused with OverloadedError.
    max_context : the most positions (prompt plus ``max_tokens``) a request may use; None: the
        model's context. It cannot exceed the model's.
    prefill_chunk : the most prompt tokens read in one step, over all requests.
    threads : Numba threads of the engine thread; None: Numba's default.
    arena : where KV caches come from; the default arena if None.

    Raises
    ------
    InvalidValueError for a size that is not a positive integer, or a ``max_context`` above
    the model's context.

    Examples
    --------
    >>> import bitnet as bn
    >>> from bitnet.serve import Engine
    >>> model = bn.load_pretrained()
    >>> with Engine(model, max_batch=4) as engine:  # doctest: +SKIP
    ...     request = engine.submit([1, 2, 3], max_tokens=8, emit=print)
    """

    def __init__(
        self,
        model: BitNetForCausalLM,
        tokenizer=None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_context: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        threads: int | None = None,
        arena: Arena | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(model, max_batch, prefill_chunk, arena, max_context)
        self.max_queue = checks.positive_int(max_queue, "max_queue")
        self.threads = None if threads is None else checks.positive_int(threads, "threads")
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _outstanding and _closing
        self._outstanding = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: Exception | None = None
        release_worker_threads()

    @property
    def context(self) -> int:
        """The most positions (prompt plus ``max_tokens``) a request may use."""
        return self.scheduler.context

    @property
    def outstanding(self) -> int:
        """Requests submitted that have not ended yet (running or waiting)."""
        return self._outstanding

    def start(self) -> Engine:
        """Start the engine thread and wait until it has warmed up (compiled) every kernel a step calls.

        Raises whatever the warm-up raised (the engine is then closed). Returns the engine.
        """
        if self._thread is not None:
            raise errors.InvalidValueError("this engine has already been started")
        self._thread = threading.Thread(target=self._run, name="bitnet-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        return self

    def close(self) -> None:
        """Stop the engine thread; requests still waiting or running end with an OverloadedError output."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._inbox.put(_STOP)
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(
        self,
        prompt: list[int] | np.ndarray,
        max_tokens: int,
        emit: Callable[[Output], None],
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Iterable[str] = (),
        stop_ids: Iterable[int] | None = None,
        strip_start: bool = False,
    ) -> Sequence:
        """Queue a request; its outputs go to ``emit`` (on the engine thread), the last one ending it.

        Parameters
        ----------
        prompt : the prompt's token ids.
        max_tokens : the most tokens to generate.
        emit : called with each :class:`~bitnet.serve.scheduler.Output`; keep it quick (hand
            the output to another thread). An exception from it cancels the request.
        temperature, top_k, top_p, seed : sampling, as :meth:`bitnet.BitNetForCausalLM.generate`.
        stop : strings that end the text (not included in it); needs a tokenizer.
        stop_ids : token ids that end it; None: the model's EOS ids.
        strip_start : drop whitespace at the start of the text.

        Returns
        -------
        Sequence : call its ``cancel()`` to end the request early (a client gone).

        Raises
        ------
        InvalidValueError for bad settings or prompt ids; ContextLengthError when the prompt
        plus ``max_tokens`` exceeds :attr:`context`; OverloadedError when ``max_queue``
        requests are already waiting, or the engine is not running.
        """
        sampler = Sampler(temperature, top_k, top_p, seed)
        stop = list(stop)
        if stop and self.tokenizer is None:
            raise errors.InvalidValueError("stop strings need a tokenizer: give the engine one")
        text = None if self.tokenizer is None else TextStream(self.tokenizer, stop, strip_start)
        stop_ids = self.model.config.stop_token_ids if stop_ids is None else stop_ids
        sequence = Sequence(prompt, max_tokens, sampler, emit, stop_ids, text)
        self.scheduler.check(sequence)
        with self._lock:
            if self._closing or self._thread is None:
                raise errors.OverloadedError("the engine is not running (shutting down, or not started yet)")
            if self._outstanding >= self.scheduler.max_batch + self.max_queue:
                raise errors.OverloadedError(
                    f"the server is busy: {self.scheduler.max_batch} requests running and {self.max_queue} waiting; "
                    f"retry later"
                )
            self._outstanding += 1
            self._inbox.put(sequence)
        return sequence

    def _run(self) -> None:
        try:
            if self.threads is not None:
                set_num_threads(self.threads)  # Numba's setting is per thread: this one runs the model
            self._warm_up()
        except Exception as exc:
            self._start_error = exc
            self._closing = True
            self._started.set()
            return
        self._started.set()
        try:
            while self._take(block=not self.scheduler.busy):
                ended = self.scheduler.step()
                with self._lock:
                    self._outstanding -= len(ended)
        except Exception as exc:  # a bug: end every request with it rather than leave them waiting forever
            log.exception("the engine thread failed")
            with self._lock:
                self._closing = True
            self.scheduler.close(exc)
            return
        self.scheduler.close(errors.OverloadedError("the server is shutting down"))

    def _take(self, block: bool) -> bool:
        """Move submitted requests into the scheduler (waiting for one if ``block``); False once closing."""
        while True:
            try:
                sequence = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if sequence is _STOP:
                return False
            self.scheduler.add(sequence)
            block = False

    def _warm_up(self) -> None:
        """Run each kernel a step calls once (Numba compiles on first call): a decode of one sequence
        over a short context (attention on one thread) and over a long one (on all), a decode of
        two sequences, and a prefill chunk, on throwaway caches."""
        chunk = max(1, min(self.scheduler.prefill_chunk, self.context - 2))
        caches = [self.model.new_cache(chunk + 2, arena=self.scheduler.arena) for _ in range(2)]
        try:
            self.model.forward_batch([np.zeros(1, np.int64)], caches[1:])
            self.model.forward_batch([np.zeros(chunk, np.int64)], caches[:1])
            self.model.forward_batch([np.zeros(1, np.int64)], caches[:1])
            self.model.forward_batch([np.zeros(1, np.int64)] * 2, caches)
        finally:
            for cache in caches:
                cache.release()

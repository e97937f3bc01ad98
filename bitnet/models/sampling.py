"""Turning a row of logits into the next token: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import math

import numpy as np

from .. import errors
from ..nn.checks import is_int, is_real


class Sampler:
    """Pick the next token id from float logits ``(vocab,)``.

    ``temperature == 0`` is greedy argmax (first index on ties, as ``torch.argmax``).
    Otherwise the logits are divided by ``temperature``, cut to the ``top_k`` largest,
    then to the smallest set whose probability reaches ``top_p``, and one token is drawn
    from the renormalized softmax with a generator seeded by ``seed``.
    """

    def __init__(
        self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None
    ) -> None:
        if not is_real(temperature) or not (math.isfinite(temperature) and temperature >= 0):
            raise errors.InvalidValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        if top_k is not None and (not is_int(top_k) or top_k < 1):
            raise errors.InvalidValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        if top_p is not None and (not is_real(top_p) or not 0 < top_p <= 1):
            raise errors.InvalidValueError(f"top_p must lie in (0, 1] (or be None), got {top_p!r}")
        if seed is not None and (not is_int(seed) or seed < 0):
            raise errors.InvalidValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        candidates, scaled = self._candidates(logits.astype(np.float64) / self.temperature)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.top_p is not None:
            order = np.argsort(-probs, kind="stable")
            keep = int(np.searchsorted(np.cumsum(probs[order]), self.top_p)) + 1
            candidates, probs = candidates[order[:keep]], probs[order[:keep]]
            probs /= probs.sum()
        return int(candidates[self.rng.choice(len(probs), p=probs)])

    def _candidates(self, scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids still in the running and their scaled logits (all of them without ``top_k``)."""
        if self.top_k is None or self.top_k >= scaled.size:
            return np.arange(scaled.size), scaled
        top = np.argpartition(-scaled, self.top_k - 1)[: self.top_k]
        return top, scaled[top]

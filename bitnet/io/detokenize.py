"""Generated tokens to text as they come: incremental detokenization, cut before the first stop string."""

from __future__ import annotations

from collections.abc import Iterable

from .. import errors

INCOMPLETE = "\ufffd"  # what a tokenizer decodes the first bytes of a multi-byte character to


class TextStream:
    """The text of a growing list of tokens, handed out piece by piece.

    Each :meth:`push` decodes only a window of the last few tokens (so a step costs the same at
    token 10 and token 10,000), waits while a multi-byte character is incomplete, and returns
    the new text that is safe to show: text that may turn out to begin a stop string is held
    back until it does not. At the first stop string the text is cut before it (as OpenAI's
    ``stop``: the stop string itself is not part of the text) and :attr:`stopped` turns True.

    Parameters
    ----------
    tokenizer : a ``tokenizers.Tokenizer`` (anything with ``decode(ids) -> str``).
    stop : strings that end the text.
    strip_start : drop whitespace at the start of the text (a reply after ``"Assistant:"``).
    skip : text already shown that the tokens' text begins with (the tail of a healed
        prompt), not shown again.

    Raises
    ------
    InvalidValueError for a stop that is not a non-empty string.
    """

    def __init__(self, tokenizer, stop: Iterable[str] = (), strip_start: bool = False, skip: str = "") -> None:
        self.stop = tuple(stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise errors.InvalidValueError(f"a stop string must be a non-empty string, got {s!r:.80}")
        self.tokenizer = tokenizer
        self.strip_start = strip_start
        self.text = ""  # decoded so far, cut at the first stop string
        self.stopped = False
        self._tokens: list[int] = []
        self._window = 0  # the first token decoded again, for the context its text depends on
        self._read = 0  # tokens whose text is in self.text
        self._shown = len(skip)

    @property
    def shown(self) -> str:
        """The text handed out so far."""
        return self.text[: self._shown]

    def push(self, token: int) -> str:
        """Add one token; returns the text to show now (often "", never text after a stop string)."""
        if self.stopped:
            return ""
        self._tokens.append(token)
        before = self.tokenizer.decode(self._tokens[self._window:self._read])
        after = self.tokenizer.decode(self._tokens[self._window:])
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""  # a character still incomplete, or a token without text
        self._window, self._read = self._read, len(self._tokens)
        self.text += after[len(before):]
        if self.strip_start and self._shown == 0:
            self.text = self.text.lstrip()
        return self._release()

    def flush(self) -> str:
        """The text still held back (a possible start of a stop string that never completed): the stream ended."""
        piece = "" if self.stopped else self.text[self._shown:]
        self._shown = len(self.text)
        return piece

    def _release(self) -> str:
        cut = min((i for i in (self.text.find(s, self._shown) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            end = cut
        else:
            end = len(self.text) - self._held_back()
        piece = self.text[self._shown:end]
        self._shown = end
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of the unshown text that begins a stop string."""
        unshown = self.text[self._shown:]
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(unshown)), 0, -1)
                    if unshown.endswith(s[:k])), default=0)

"""Token ids in, text pieces out, for streaming: cut at stop strings, never half a character.

The whole completion is decoded again at each token (tokenizers merge pieces across token
boundaries, e.g. byte-level BPE splits one UTF-8 character over several tokens), and only the
text that can no longer change is sent: a trailing U+FFFD (an incomplete character) and any tail
that could still grow into a stop string are held back until the next token decides.
"""

from __future__ import annotations

from typing import Sequence

_INCOMPLETE = "\ufffd"


class TextStream:
    """The text of one completion, sent piece by piece."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.text = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token: (the text that is now final, whether a stop string ended the text)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # Text already sent never holds a stop string nor the start of one, so search after it.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        """The rest of the text (what was held back), once the completion has ended."""
        return self._take(len(self.text))

    def _held_back(self) -> int:
        tail = len(self.text) - len(self.text.rstrip(_INCOMPLETE))
        for s in self.stop:
            # The longest end of the text that is a proper start of s.
            for n in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(s[:n]):
                    tail = max(tail, n)
                    break
        return tail

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

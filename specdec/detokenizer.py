"""One request's output text, grown a token at a time (the request owns it; the scheduler feeds it).

Decoding the whole output after every token costs a decode of everything generated so far, so
a long generation is quadratic. This keeps two offsets into the ids instead, as vLLM's and TGI's
detokenizers do:

    ids[:prefix]          decoded long ago; its text is in `text`
    ids[prefix:read]      the context window: decoded again so that the next token's text is
                          cut the way a whole decode cuts it (a byte-level BPE's split UTF-8
                          character, a SentencePiece word's leading space)
    ids[read:]            tokens whose text is not out yet (an incomplete UTF-8 character
                          decodes to U+FFFD; it is held until a later token completes it)

Each `push` decodes only ids[prefix:], a few tokens, and appends what became final to `text`.
`final_text()` is what the whole decode gives now (held bytes included as U+FFFD).
Tested against the whole decode at every step in tests/test_detokenizer.py.
"""

from __future__ import annotations

from collections.abc import Callable

Decode = Callable[[list[int]], str]

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class IncrementalDetokenizer:
    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""  # final text of ids[:read]
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        """Add one token; returns the text it made final ("" while a character is incomplete)."""
        self.ids.append(token)
        window = self.ids[self._prefix:]
        before = self._decode(window[: self._read - self._prefix])
        after = self._decode(window)
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing new yet, or it ends in an incomplete character: hold it
        delta = after[len(before):]
        self.text += delta
        self._prefix, self._read = self._read, len(self.ids)
        return delta

    def final_text(self) -> str:
        """The whole output's text, including what is still held (as the whole decode shows it)."""
        if self._read == len(self.ids):
            return self.text
        window = self.ids[self._prefix:]
        before = self._decode(window[: self._read - self._prefix])
        return self.text + self._decode(window)[len(before):]

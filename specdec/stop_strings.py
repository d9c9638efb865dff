"""Stop strings checked on the tail of the output instead of the whole of it.

A request stops at the first token after which its decoded output contains one of its stop
strings. Every earlier token was checked already, so a match that appears now must end in the
text the newest token completed; it starts at most `longest` characters before the start of
that text.
Decoding only a tail of the output that yields that many characters (plus a margin for what a
window's cut can do to its first characters: a split UTF-8 sequence decodes to U+FFFD, a
SentencePiece tokenizer drops the first token's leading space) gives the same answer as
decoding everything, at a cost that no longer grows with the output (the whole-output decode
made a long generation quadratic). Reference: `first_stop_reference` (the whole decode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Detokenize = Callable[[list[int], bool], str]

MARGIN_CHARS = 8  # characters the window's cut may spoil at its start (a few U+FFFD, a space)


def first_stop(ids: list[int], stops: Sequence[str], detokenize: Detokenize, skip_special_tokens: bool) -> str | None:
    """The first of `stops` (in their order) that the decoded `ids` contain near their end,
    i.e. what the newest token can have completed; None if none."""
    if not stops or not ids:
        return None
    # the match ends in the newest token's text and is at most `longest` characters long
    need = max(len(s) for s in stops) + len(detokenize(ids[-1:], skip_special_tokens)) + MARGIN_CHARS
    window = 4 * need  # a character is at most 4 byte tokens
    while True:
        tail = ids[-window:]
        text = detokenize(tail, skip_special_tokens)
        if len(tail) == len(ids) or len(text) >= need:
            break
        window *= 2  # special tokens skipped (no text): look further back
    return next((s for s in stops if s in text), None)


def first_stop_reference(ids: list[int], stops: Sequence[str], detokenize: Detokenize,
                         skip_special_tokens: bool) -> str | None:
    """The first of `stops` anywhere in the whole decoded output."""
    text = detokenize(ids, skip_special_tokens)
    return next((s for s in stops if s in text), None)

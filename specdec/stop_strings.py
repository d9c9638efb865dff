"""Stop strings checked on the text the newest token made final, not on the whole output.

A request stops at the first token after which its output text contains one of its stop
strings. Every earlier token was checked already, so a match that appears now must end in the
text this token made final (`new_len` characters, from the request's IncrementalDetokenizer);
it starts at most `longest - 1` characters before that text. Searching that window gives the
same answer as searching everything at a cost that does not grow with the output (decoding the
whole output at every token made a long generation quadratic). Reference: `first_stop_reference`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Detokenize = Callable[[list[int], bool], str]


def first_stop(text: str, new_len: int, stops: Sequence[str]) -> str | None:
    """The first of `stops` (in their order) that ends in the last `new_len` characters of
    `text`, i.e. that the newest text completed; None if none."""
    if not stops or new_len <= 0:
        return None
    window = text[-(new_len + max(len(s) for s in stops) - 1):]
    return next((s for s in stops if s in window), None)


def first_stop_reference(ids: list[int], stops: Sequence[str], detokenize: Detokenize,
                         skip_special_tokens: bool) -> str | None:
    """The first of `stops` anywhere in the whole decoded output."""
    text = detokenize(ids, skip_special_tokens)
    return next((s for s in stops if s in text), None)

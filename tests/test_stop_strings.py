"""Stop strings on the output's tail (specdec/stop_strings.py) against the whole-output decode,
with the embedded model's byte-level tokenizer: random outputs mixing whole words, single-byte
tokens (split UTF-8 characters) and special tokens, stop strings cut from their own text."""

from __future__ import annotations

import random

import pytest

from specdec.stop_strings import first_stop, first_stop_reference
from specdec.target.embedded import ensure_embedded_model


@pytest.fixture(scope="module")
def detokenize():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ensure_embedded_model()))

    def run(ids: list[int], skip_special_tokens: bool) -> str:
        return str(tok.decode(ids, skip_special_tokens=skip_special_tokens))

    run.tokenizer = tok  # type: ignore[attr-defined]
    return run


def random_output(tok, rng: random.Random, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    words = tok.encode(" the cat sat on a mat; naïve café 😀 über ∑ 中文 ok!", add_special_tokens=False)
    emoji_bytes = tok.encode("😀中", add_special_tokens=False)  # several byte tokens per character
    special = list(tok.all_special_ids)
    ids: list[int] = []
    while len(ids) < n:
        r = rng.random()
        if r < 0.5:
            ids.append(rng.choice(words))
        elif r < 0.7:
            ids.extend(emoji_bytes)
        elif r < 0.85:
            ids.extend([rng.choice(special)] * rng.randint(1, 40))  # long runs of skipped tokens
        else:
            ids.append(rng.randrange(len(tok)))
    return ids[:n]


def first_hit(ids: list[int], stops: list[str], find, detok, skip: bool) -> tuple[int, str] | None:  # type: ignore[no-untyped-def]
    for i in range(1, len(ids) + 1):  # as the scheduler checks: after every token
        hit = find(ids[:i], stops, detok, skip)
        if hit is not None:
            return i, hit
    return None


@pytest.mark.parametrize("seed", range(12))
def test_the_tail_check_stops_where_the_whole_decode_does(detokenize, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    tok = detokenize.tokenizer
    ids = random_output(tok, rng, 160)
    skip = seed % 2 == 0
    text = detokenize(ids, skip)
    stops = []
    for _ in range(3):  # substrings of the output itself (some spanning split characters), one absent
        a = rng.randrange(max(1, len(text) - 1))
        stops.append(text[a : a + rng.randint(1, 12)])
    stops.append("never in the output \u2603\u2603")
    expected = first_hit(ids, stops, first_stop_reference, detokenize, skip)
    assert expected is not None  # the substrings are in the whole text
    assert first_hit(ids, stops, first_stop, detokenize, skip) == expected


def test_the_tail_check_decodes_a_bounded_window(detokenize) -> None:  # type: ignore[no-untyped-def]
    tok = detokenize.tokenizer
    ids = random_output(tok, random.Random(99), 3000)
    decoded: list[int] = []

    def counting(window: list[int], skip: bool) -> str:
        decoded.append(len(window))
        return detokenize(window, skip)

    assert first_stop(ids, ["never there \u2603"], counting, True) is None
    assert max(decoded) < 1000  # the whole output is 3000 tokens
    assert first_stop([], ["x"], counting, True) is None and first_stop(ids, [], counting, True) is None

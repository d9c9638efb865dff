"""The request's incremental text (specdec/detokenizer.py), the stop strings checked on it
(specdec/stop_strings.py) and the server's stream deltas (server/openai_api.TextStreamer),
each against the whole-output decode, with the embedded model's byte-level tokenizer: random
outputs mixing whole words, single-byte tokens (split UTF-8 characters), invalid byte runs and
special tokens, stop strings cut from their own text."""

from __future__ import annotations

import random

import pytest

from server.streaming import TextStreamer
from specdec.detokenizer import REPLACEMENT, IncrementalDetokenizer
from specdec.sampling_params import SamplingParams
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


def incremental(detokenize, skip: bool, log: list[int] | None = None) -> IncrementalDetokenizer:  # type: ignore[no-untyped-def]
    def decode(ids: list[int]) -> str:
        if log is not None:
            log.append(len(ids))
        return str(detokenize(ids, skip))

    return IncrementalDetokenizer(decode)


@pytest.mark.parametrize("seed", range(8))
def test_the_incremental_text_is_the_whole_decode_at_every_token(detokenize, seed: int) -> None:  # type: ignore[no-untyped-def]
    ids = random_output(detokenize.tokenizer, random.Random(seed), 300)
    skip = seed % 2 == 0
    detok = incremental(detokenize, skip)
    pieces = []
    for i, t in enumerate(ids, 1):
        pieces.append(detok.push(t))
        whole = detokenize(ids[:i], skip)
        assert detok.final_text() == whole, i
        assert whole.startswith(detok.text) and "".join(pieces) == detok.text
        held = whole[len(detok.text):]
        assert len(held) <= 8 and (not held or held.endswith(REPLACEMENT))  # only an unfinished character


def first_hit(ids: list[int], stops: list[str], detokenize, skip: bool) -> tuple[int, str] | None:  # type: ignore[no-untyped-def]
    """As the scheduler checks: after every token, on the text that token made final."""
    detok = incremental(detokenize, skip)
    for i, t in enumerate(ids, 1):
        new = detok.push(t)
        hit = first_stop(detok.text, len(new), stops)
        if hit is not None:
            return i, hit
    return None


def first_hit_reference(ids: list[int], stops: list[str], detokenize, skip: bool) -> tuple[int, str] | None:  # type: ignore[no-untyped-def]
    for i in range(1, len(ids) + 1):
        hit = first_stop_reference(ids[:i], stops, detokenize, skip)
        if hit is not None:
            return i, hit
    return None


@pytest.mark.parametrize("seed", range(12))
def test_the_incremental_check_stops_where_the_whole_decode_does(detokenize, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    ids = random_output(detokenize.tokenizer, rng, 160)
    skip = seed % 2 == 0
    text = detokenize(ids, skip)
    stops: list[str] = []
    while len(stops) < 3:  # substrings of the output itself (some spanning multi-byte characters)
        a = rng.randrange(max(1, len(text) - 1))
        stop = text[a : a + rng.randint(1, 12)]
        if stop and REPLACEMENT not in stop:  # (an unfinished character is not text yet)
            stops.append(stop)
    stops.append("never in the output \u2603\u2603")
    expected = first_hit_reference(ids, stops, detokenize, skip)
    assert expected is not None  # the substrings are in the whole text
    assert first_hit(ids, stops, detokenize, skip) == expected


def test_the_check_only_looks_at_the_new_text() -> None:
    assert first_stop("abc STOP", 4, ["STOP"]) == "STOP"
    assert first_stop("abc STOP", 1, ["STOP"]) == "STOP"  # the newest character completed it
    assert first_stop("STOP abc", 3, ["STOP"]) is None  # matched (and stopped) earlier
    assert first_stop("abc", 0, ["abc"]) is None and first_stop("abc", 3, []) is None
    assert first_stop("xab", 1, ["zz", "ab", "b"]) == "ab"  # the first in the request's order


def test_each_token_decodes_a_bounded_window(detokenize) -> None:  # type: ignore[no-untyped-def]
    ids = random_output(detokenize.tokenizer, random.Random(99), 3000)
    decoded: list[int] = []
    detok = incremental(detokenize, True, decoded)
    for t in ids:
        detok.push(t)
    assert detok.final_text() == detokenize(ids, True)
    assert max(decoded) < 200  # the whole output is 3000 tokens (runs of skipped tokens are <= 40 long)


@pytest.mark.parametrize("seed", range(6))
def test_stream_deltas_add_up_to_the_answer_and_hold_back_stop_starts(detokenize, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(100 + seed)
    ids = random_output(detokenize.tokenizer, rng, 200)
    text = detokenize(ids, True)
    a = rng.randrange(len(text) // 2, len(text) - 6)
    stop = text[a : a + 5]
    if REPLACEMENT in stop:
        stop = "never \u2603"
    streamer = TextStreamer(SamplingParams(stop=(stop,)))
    detok = incremental(detokenize, True)
    sent = ""
    matched = None
    for t in ids:
        new = detok.push(t)
        if first_stop(detok.text, len(new), [stop]):
            matched = stop
            break
        sent += streamer.push(new)
        assert stop not in sent
    final = detok.final_text()
    if matched is not None:
        final = final[: final.find(matched)]
    assert final.startswith(sent)  # nothing sent was taken back
    assert sent + streamer.finish(final) == final

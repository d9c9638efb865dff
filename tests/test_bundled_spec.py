"""Speculative decoding on the embedded SmolLM2-135M-Instruct: lossless greedy output and
n-gram acceptance on a copy task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import specdec
from specdec.draft.heads import shipped_head_for_embedded
from specdec.server.chat_template import load_chat_template

from .spec_models import make_random_eagle3

pytestmark = pytest.mark.slow

PASSAGE = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step. To be or not to be, that is the question."
)
QUESTIONS = ["What is the boiling point of water?", "Give me three tips for staying healthy.",
             "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def base() -> Any:
    return specdec.Engine(dtype="float32", max_total_tokens=8192, log_level="warning")


def _chat(engine: Any, text: str) -> list[int]:
    prompt = load_chat_template(None, engine.model_path).render([{"role": "user", "content": text}])
    return list(engine.encode(prompt))


def test_ngram_accepts_long_runs_on_a_copy_task(base: Any) -> None:
    engine = specdec.Engine(dtype="float32", max_total_tokens=8192, log_level="warning",
                            speculative_algorithm="NGRAM", speculative_num_steps=7,
                            speculative_eagle_topk=1, speculative_num_draft_tokens=8)
    ids = _chat(engine, f"Repeat this passage exactly, word for word:\n\n{PASSAGE}")
    out = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 48})
    ref = base.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 48})
    assert out["output_ids"] == ref["output_ids"]
    assert out["meta_info"]["spec_accept_length"] >= 3.0


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shipped = shipped_head_for_embedded()
    if shipped is not None:
        return shipped
    path = tmp_path_factory.mktemp("head")
    make_random_eagle3(path, 576, 49152, seed=0, draft_vocab=4096, aux_layer_ids=None, scale=0.05)
    return path


@pytest.mark.parametrize("tree", [(5, 4, 8), (3, 1, 4)])
def test_eagle3_greedy_equals_plain_decoding(base: Any, head: Path, tree: tuple[int, int, int]) -> None:
    steps, topk, ndt = tree
    engine = specdec.Engine(dtype="float32", max_total_tokens=8192, log_level="warning",
                            speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head),
                            speculative_num_steps=steps, speculative_eagle_topk=topk,
                            speculative_num_draft_tokens=ndt)
    ids = [_chat(engine, q) for q in QUESTIONS]
    params = {"temperature": 0, "max_new_tokens": 40}
    outs = engine.generate(input_ids=ids, sampling_params=params)
    refs = base.generate(input_ids=ids, sampling_params=params)
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in refs]
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


def test_eagle3_greedy_with_logit_bias_and_penalties_equals_plain_decoding(base: Any, head: Path) -> None:
    """The bias and penalties change the target's logits at every verified node as plain decoding
    does (the draft proposes without them; verification keeps the output exact)."""
    engine = specdec.Engine(dtype="float32", max_total_tokens=8192, log_level="warning",
                            speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head),
                            speculative_num_steps=5, speculative_eagle_topk=4, speculative_num_draft_tokens=8,
                            speculative_adaptive="off")
    ids = [_chat(engine, q) for q in QUESTIONS]
    ref0 = base.generate(input_ids=ids[0], sampling_params={"temperature": 0, "max_new_tokens": 8})
    bias = {str(t): -100 for t in ref0["output_ids"][:3]}  # ban the first plain tokens
    bias[str(engine.encode(" water")[0])] = 4.0
    params = {"temperature": 0, "max_new_tokens": 32, "logit_bias": bias, "frequency_penalty": 0.5}
    outs = engine.generate(input_ids=ids, sampling_params=params)
    refs = base.generate(input_ids=ids, sampling_params=params)
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in refs]
    assert outs[0]["output_ids"][:3] != ref0["output_ids"][:3]
    banned = set(ref0["output_ids"][:3]) - {engine.encode(" water")[0]}
    assert not banned & set(outs[0]["output_ids"])


def test_shipped_head_accepts_more_than_two_tokens_per_step() -> None:
    """The trained head's headline figure on held-out GSM8K-style prompts (never trained on):
    greedy, default tree (5, 4, 8), float32; accept length = emitted tokens / verify steps."""
    import json

    shipped = shipped_head_for_embedded()
    assert shipped is not None, "the embedded model must ship an EAGLE3 head"
    rows = [json.loads(line) for line in (shipped / "heldout_prompts.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows if r["source"].startswith("gsm8k")][:4]
    # the tree fixed (adaptive shapes follow this machine's measured costs, so they would make
    # the figure depend on timing)
    with specdec.Engine(dtype="float32", max_total_tokens=8192, log_level="warning",
                        speculative_algorithm="EAGLE3", speculative_draft_model_path=str(shipped),
                        speculative_num_steps=5, speculative_eagle_topk=4, speculative_num_draft_tokens=8) as engine:
        outs = engine.generate(input_ids=[_chat(engine, p) for p in prompts],
                               sampling_params={"temperature": 0, "max_new_tokens": 96})
    steps = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    emitted = sum(len(o["output_ids"]) for o in outs)
    assert emitted / steps > 2.0, f"accept length {emitted / steps:.2f}"

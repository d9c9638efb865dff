"""The chat data pipeline of the draft trainer (draft/chat_data.py, draft/chat_generate.py):
balanced sampling by category, the held-out split never reaching training, multi-turn
conversations through the chat template, batched generation equal to one at a time."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from specdec.draft.chat_data import balanced_order, chat_pool
from specdec.draft.chat_generate import generate_conversations, plan_for
from specdec.draft.data_split import is_heldout
from specdec.draft.train_data import DEFAULT_DATA_DIR, read_jsonl, response_tokens

BENCH_HELDOUT = Path(__file__).resolve().parent.parent / "bench" / "data" / "chat_heldout.jsonl"


def _rows(sizes: dict[str, int], sources: int = 2) -> list[dict[str, Any]]:
    return [{"category": c, "source": f"{c}-{i % sources}", "prompt": f"{c} {i}"}
            for c, n in sizes.items() for i in range(n)]


def test_balanced_order_is_balanced_in_every_prefix() -> None:
    rows = _rows({"big": 100, "mid": 20, "small": 3})
    order = balanced_order(rows, seed=0)
    assert sorted(r["prompt"] for r in order) == sorted(r["prompt"] for r in rows)  # all, once
    assert Counter(r["category"] for r in order[:9]) == {"big": 3, "mid": 3, "small": 3}
    # the small category runs out, then the others share its turns
    assert Counter(r["category"] for r in order[:30]) == {"big": 14, "mid": 13, "small": 3}
    # sources inside a category alternate
    big = [r["source"] for r in order if r["category"] == "big"][:10]
    assert big == ["big-0", "big-1"] * 5 or big == ["big-1", "big-0"] * 5
    assert balanced_order(rows, seed=0) == order and balanced_order(rows, seed=1) != order


def test_chat_pool_never_holds_a_heldout_prompt(tmp_path: Path) -> None:
    prompts = [f"Write a poem about the number {i}." for i in range(400)]
    held = [p for p in prompts if is_heldout(p)]
    assert held, "the sample should contain held-out prompts"
    (tmp_path / "chat_prompts.jsonl").write_text(
        "".join(json.dumps({"source": "s", "category": "writing", "prompt": p, "licence": "x"}) + "\n"
                for p in prompts))
    pool = chat_pool(tmp_path, exclude={prompts[1]})
    texts = {r["prompt"] for r in pool}
    assert not texts & set(held)
    assert prompts[1] not in texts
    assert len(texts) == len(prompts) - len(held) - (0 if prompts[1] in held else 1)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        chat_pool(tmp_path / "missing")


@pytest.mark.skipif(not (DEFAULT_DATA_DIR / "chat_prompts.jsonl").exists(), reason="needs ../shared/data")
def test_the_benchmark_prompts_never_reach_training() -> None:
    pool = {r["prompt"] for r in chat_pool(DEFAULT_DATA_DIR)}
    bench = [r["prompt"].strip() for r in read_jsonl(BENCH_HELDOUT)]
    assert bench and not pool & set(bench)
    assert len({r["category"] for r in chat_pool(DEFAULT_DATA_DIR)}) >= 8


def test_generation_plans_mix_greedy_sampled_and_two_turn() -> None:
    plans = [plan_for(i, 0, 0.3, 0.5, (0.7, 1.0)) for i in range(2000)]
    sampled = [p.temperature for p in plans if p.temperature > 0]
    assert 0.25 < len(sampled) / len(plans) < 0.35
    assert min(sampled) >= 0.7 and max(sampled) <= 1.0 and len(set(sampled)) >= 5
    assert 0.45 < sum(p.turns == 2 for p in plans) / len(plans) < 0.55
    assert plan_for(7, 0, 0.3, 0.5, (0.7, 1.0)) == plans[7]


# ---- through the engine (the embedded model) --------------------------------------------------
PROMPTS = [{"source": "t", "category": "chat", "prompt": p} for p in
           ("Name three colours.", "What is 2 + 2?", "Say hello in French.", "List two fruits.")]


@pytest.fixture(scope="module")
def engine() -> Any:
    import specdec

    with specdec.Engine(dtype="float32", log_level="warning", max_running_requests=8,
                        max_total_tokens=8 * 512) as e:
        yield e


def _template(engine: Any) -> Any:
    from specdec.server.chat_template import load_chat_template

    return load_chat_template(None, engine.model_path)


def test_multi_turn_conversations_render_through_the_chat_template(engine: Any, tmp_path: Path) -> None:
    tpl = _template(engine)
    rows = generate_conversations(engine, tpl, PROMPTS, tmp_path / "r.jsonl", max_new_tokens=12,
                                  sample_frac=0.0, multi_turn_frac=1.0, seed=0)
    two = [r for r in rows if r["turns"] == 2]
    assert len(two) >= 2
    eos = engine.detokenize(engine.eos_token_ids[:1], False)
    for r in two:
        (a0, e0), (a1, e1) = r["spans"]
        ids = r["input_ids"]
        assert e1 == len(ids) and a0 < e0 < a1
        answer = engine.detokenize(ids[a0:e0], False).removesuffix(eos)
        messages = [{"role": "user", "content": r["user_turns"][0]}, {"role": "assistant", "content": answer},
                    {"role": "user", "content": r["user_turns"][1]}]
        # the conversation up to the second answer is what the server would render
        assert engine.detokenize(ids[:a1], False) == tpl.render(messages)
        assert response_tokens(r) == ids[a0:e0] + ids[a1:e1]
    # resumable: a second call answers nothing new
    again = generate_conversations(engine, tpl, PROMPTS, tmp_path / "r.jsonl", max_new_tokens=12,
                                   sample_frac=0.0, multi_turn_frac=1.0, seed=0)
    assert again == rows and len(read_jsonl(tmp_path / "r.jsonl")) == len(PROMPTS)


def test_a_resumed_run_answers_prompts_whose_keys_collide(engine: Any, tmp_path: Path) -> None:
    """Templated prompts share a key (source and first 64 characters); resuming must still
    answer every one of them (session 19 found a resume that skipped 193 of 1869)."""
    tpl = _template(engine)
    head = "Answer the question below in one short sentence, please, and be polite: "
    assert len(head) > 64
    same = [{"source": "t", "category": "chat", "prompt": head + q} for q in ("Why is the sky blue?", "What is ice?")]
    kw: dict[str, Any] = {"max_new_tokens": 8, "sample_frac": 0.0, "multi_turn_frac": 0.0, "seed": 0}
    first = generate_conversations(engine, tpl, same[:1], tmp_path / "r.jsonl", **kw)
    assert len(first) == 1
    generate_conversations(engine, tpl, same, tmp_path / "r.jsonl", **kw)
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert sorted(r["prompt"] for r in rows) == sorted(p["prompt"] for p in same)
    assert rows[0]["key"] == rows[1]["key"]  # the keys do collide
    generate_conversations(engine, tpl, same, tmp_path / "r.jsonl", **kw)  # nothing new
    assert len(read_jsonl(tmp_path / "r.jsonl")) == 2


def test_batched_generation_equals_one_at_a_time(engine: Any, tmp_path: Path) -> None:
    tpl = _template(engine)
    kw: dict[str, Any] = {"max_new_tokens": 16, "sample_frac": 0.5, "multi_turn_frac": 0.5, "seed": 3}
    batched = generate_conversations(engine, tpl, PROMPTS, tmp_path / "b.jsonl", chunk=len(PROMPTS), **kw)
    alone = generate_conversations(engine, tpl, PROMPTS, tmp_path / "a.jsonl", chunk=1, **kw)
    assert len(batched) == len(alone) == len(PROMPTS)
    by_key = {r["key"]: r["input_ids"] for r in alone}
    assert all(r["input_ids"] == by_key[r["key"]] for r in batched)  # (completion order differs)
    assert {r["temperature"] > 0 for r in batched} == {True, False}  # seed 3: both kinds
    assert {r["turns"] for r in batched} == {1, 2}

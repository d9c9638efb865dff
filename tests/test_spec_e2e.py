"""End-to-end speculative decoding on tiny random Llama 4 targets with random EAGLE3 heads:
greedy output must equal the non-speculative engine token for token; pages never leak."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .spec_models import make_random_eagle3
from .tiny_models import VOCAB, Checkpoint, make_checkpoint, random_prompts

# every Llama 4 feature at once: interleaved MoE, chunked attention, NoPE + temperature
# tuning, QK norm, llama3 rope scaling
FULL_LLAMA4: dict[str, Any] = {
    "num_hidden_layers": 4,
    "moe_layers": [1, 3],
    "no_rope_layers": [1, 1, 0, 1],
    "attention_chunk_size": 8,
    "use_qk_norm": True,
    "attn_temperature_tuning": True,
    "floor_scale": 4,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}
TREES = [(5, 4, 8), (3, 1, 4), (6, 8, 32), (2, 2, 3)]
PROMPT_LENGTHS = (1, 5, 13, 30)
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("target"), "llama4", seed=3, **FULL_LLAMA4)


@pytest.fixture(scope="module")
def baseline(target: Checkpoint) -> list[list[int]]:
    engine = target.engine()
    outs = engine.generate(
        input_ids=random_prompts(PROMPT_LENGTHS, seed=7),
        sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS},
    )
    return [o["output_ids"] for o in outs]


def _spec_engine(target: Checkpoint, draft: Path | None, tree: tuple[int, int, int], **kw: Any) -> Any:
    steps, topk, ndt = tree
    return target.engine(
        speculative_algorithm="EAGLE3" if draft else "NGRAM",
        speculative_draft_model_path=str(draft) if draft else None,
        speculative_num_steps=steps,
        speculative_eagle_topk=topk,
        speculative_num_draft_tokens=ndt,
        **kw,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tree", TREES)
def test_eagle3_greedy_is_lossless(
    target: Checkpoint, baseline: list[list[int]], tmp_path: Path, seed: int, tree: tuple[int, int, int]
) -> None:
    draft = tmp_path / "draft"
    make_random_eagle3(draft, 32, VOCAB, seed=seed, draft_vocab=64 if seed % 2 else None)
    engine = _spec_engine(target, draft, tree, page_size=1 + 15 * (seed % 2))
    outs = engine.generate(
        input_ids=random_prompts(PROMPT_LENGTHS, seed=7),
        sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS},
    )
    assert [o["output_ids"] for o in outs] == baseline
    for o in outs:
        m = o["meta_info"]
        assert m["spec_verify_ct"] >= 1
        assert m["spec_accept_length"] == pytest.approx(m["completion_tokens"] / m["spec_verify_ct"], abs=1.0)
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


@pytest.mark.parametrize("tree", [(5, 4, 8), (7, 1, 8)])
def test_ngram_greedy_is_lossless(target: Checkpoint, baseline: list[list[int]], tree: tuple[int, int, int]) -> None:
    engine = _spec_engine(target, None, tree)
    outs = engine.generate(
        input_ids=random_prompts(PROMPT_LENGTHS, seed=7),
        sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS},
    )
    assert [o["output_ids"] for o in outs] == baseline
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


def test_preemption_under_speculation_is_lossless(
    target: Checkpoint, baseline: list[list[int]], tmp_path: Path
) -> None:
    draft = tmp_path / "draft"
    make_random_eagle3(draft, 32, VOCAB, seed=5)
    # room for about two requests at a time: the others wait or get preempted and recomputed
    engine = _spec_engine(target, draft, (5, 4, 8), page_size=4, max_total_tokens=160)
    outs = engine.generate(
        input_ids=random_prompts(PROMPT_LENGTHS, seed=7),
        sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS},
    )
    assert [o["output_ids"] for o in outs] == baseline
    assert engine.metrics.preemptions > 0
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


def test_sampling_with_speculation_is_reproducible_and_frees_pages(target: Checkpoint, tmp_path: Path) -> None:
    draft = tmp_path / "draft"
    make_random_eagle3(draft, 32, VOCAB, seed=6)
    engine = _spec_engine(target, draft, (4, 3, 8))
    params = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 16, "seed": 11, "frequency_penalty": 0.2}
    prompts = random_prompts((4, 9), seed=8)
    a = engine.generate(input_ids=prompts, sampling_params=params)
    b = engine.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
    assert all(len(o["output_ids"]) == 16 for o in a)
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


def test_abort_mid_stream_frees_pages(target: Checkpoint, tmp_path: Path) -> None:
    draft = tmp_path / "draft"
    make_random_eagle3(draft, 32, VOCAB, seed=4)
    engine = _spec_engine(target, draft, (5, 4, 8))
    stream = engine.generate(
        input_ids=random_prompts((6,), seed=9)[0],
        sampling_params={"temperature": 0, "max_new_tokens": 40},
        stream=True,
    )
    next(stream)
    next(stream)
    assert engine.allocator.num_free_pages < engine.allocator.num_pages
    stream.close()  # the consumer goes away: the request is aborted
    assert engine.allocator.num_free_pages == engine.allocator.num_pages
    assert engine.metrics.requests_aborted == 1


def test_many_steps_do_not_leak_pages(target: Checkpoint, tmp_path: Path) -> None:
    draft = tmp_path / "draft"
    make_random_eagle3(draft, 32, VOCAB, seed=2)
    engine = _spec_engine(target, draft, (3, 2, 6), page_size=3)
    for round_ in range(4):
        engine.generate(
            input_ids=random_prompts((3, 7, 2), seed=round_),
            sampling_params={"temperature": 0.5 * (round_ % 2), "max_new_tokens": 40, "seed": round_},
        )
        engine.allocator.check_invariants()
        assert engine.allocator.num_free_pages == engine.allocator.num_pages
    assert engine.metrics.spec_verify_ct > 100

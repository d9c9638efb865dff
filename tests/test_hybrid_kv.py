"""Hybrid KV (`--swa-full-tokens-ratio`) on a tiny Llama 4 with 3 of 4 layers chunked: the chunked
layers' pool keeps only each request's current chunk window, the output is unchanged (against
transformers, and exactly against one pool), under chunked prefill, tree verification that
crosses chunk boundaries, EAGLE3, the prefix cache and preemption; nothing leaks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from specdec.swa_table import window_pages_needed

from .spec_models import make_random_eagle3
from .tiny_models import Checkpoint, compare_with_hf, hf_logprobs, make_checkpoint, random_prompts

CHUNK = 8
TOL = 1e-4  # logprob agreement with transformers (float32 both sides)
HYBRID = {
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "moe_layers": None,
    "interleave_moe_layer_step": 2,
    "intermediate_size_mlp": 40,
    "attention_chunk_size": CHUNK,
    "no_rope_layers": None,
    "no_rope_layer_interval": 4,  # NoPE (full attention) on layer 3 only
    "use_qk_norm": True,
    "attn_temperature_tuning": True,
    "floor_scale": 4,
    "attn_scale": 0.5,
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("hybrid") / "m", "llama4", seed=3, **HYBRID)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hybrid_head") / "eagle3"
    make_random_eagle3(path, target_hidden=32, vocab=128, aux_layer_ids=(0, 1, 2))
    return path


def _greedy(engine: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": n,
                                                                "ignore_eos": True})
    return [o["output_ids"] for o in outs]


def _all_free(engine: Any) -> None:
    for alloc in (engine.allocator, engine.swa_allocator):
        alloc.check_invariants()
        assert alloc.num_free_pages == alloc.num_pages


def test_three_of_four_layers_get_the_window_pool(ckpt: Checkpoint) -> None:
    engine = ckpt.engine(page_size=4)
    assert engine.hybrid_kv and engine.runner.swa_layers == (True, True, True, False)
    assert len(engine.kv_pool.k) == 1 and len(engine.runner.swa_pool.k) == 3
    assert engine.kv_plan.swa_tokens == int(0.8 * 1024) // 4 * 4  # SGLang's default ratio
    one = ckpt.engine(page_size=4, disable_hybrid_swa_memory=True)
    assert not one.hybrid_kv and len(one.kv_pool.k) == 4 and one.swa_allocator is None


@pytest.mark.parametrize("page_size", [4, 3])
def test_hybrid_matches_transformers_across_chunk_boundaries(ckpt: Checkpoint, page_size: int) -> None:
    """Prompts ending on, before and after chunk boundaries; 30 new tokens cross 3-4 more.
    Page size 3 does not divide the chunk (a window starts inside a page)."""
    engine = ckpt.engine(page_size=page_size)
    prompts = random_prompts((5, 8, 9, 23), seed=11)
    compare_with_hf(engine, ckpt.hf, prompts, 30, TOL)
    _all_free(engine)


@pytest.mark.parametrize("chunked_prefill", [3, 8, 13])
def test_hybrid_output_equals_one_pool_exactly(ckpt: Checkpoint, chunked_prefill: int) -> None:
    """Greedy tokens identical to the single pool, prefill chunks cutting prompts anywhere."""
    prompts = random_prompts((17, 40, 6), seed=5)
    one = _greedy(ckpt.engine(page_size=4, disable_hybrid_swa_memory=True), prompts, 40)
    engine = ckpt.engine(page_size=4, chunked_prefill_size=chunked_prefill)
    assert _greedy(engine, prompts, 40) == one
    _all_free(engine)


def test_the_window_pool_holds_only_windows(ckpt: Checkpoint) -> None:
    """A small ratio: the window pool is a fraction of the full pool, every request holds at most
    its window there, and pages are released as the window moves."""
    engine = ckpt.engine(page_size=4, swa_full_tokens_ratio=0.05, chunked_prefill_size=8)
    window = window_pages_needed(CHUNK, 4, 8)
    assert engine.kv_plan.swa_tokens < engine.kv_plan.full_tokens / 8
    prompts = random_prompts((30, 45), seed=2)
    reqs = [engine.make_request(p, _params(150)) for p in prompts]
    for r in reqs:
        engine.scheduler.add(r)
    peak = 0
    while any(not r.finished for r in reqs):
        engine.scheduler.step()
        for r in reqs:
            if r.swa_table is not None and not r.finished:
                held = len(r.swa_table.held_pages)
                assert held <= window, (r.output_len, held)
                peak = max(peak, held)
    assert peak >= CHUNK // 4  # it did hold a whole chunk
    one = _greedy(ckpt.engine(page_size=4, disable_hybrid_swa_memory=True), prompts, 150)
    assert [r.output_ids for r in reqs] == one
    _all_free(engine)


def _params(n: int) -> Any:
    from specdec.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("tree", [(5, 4, 8), (3, 1, 4)])
def test_eagle3_trees_crossing_chunk_boundaries_are_lossless(ckpt: Checkpoint, head: Path,
                                                             tree: tuple[int, int, int]) -> None:
    """Verified trees span up to 5 positions past a chunk boundary; nodes there see only their
    own chunk. Greedy output equals plain decoding with one pool."""
    prompts = random_prompts((7, 20, 33), seed=9)
    plain = _greedy(ckpt.engine(page_size=4, disable_hybrid_swa_memory=True), prompts, 48)
    steps, topk, tokens = tree
    engine = ckpt.engine(page_size=4, speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head),
                         speculative_num_steps=steps, speculative_eagle_topk=topk,
                         speculative_num_draft_tokens=tokens, speculative_adaptive="off")
    assert engine.hybrid_kv
    outs = _greedy(engine, prompts, 48)
    assert outs == plain
    assert engine.metrics.spec_correct_drafts > 0  # some drafts were accepted
    for prompt, out in zip(prompts, outs, strict=True):  # and they are transformers' greedy tokens
        _assert_hf_greedy(ckpt, prompt, out)
    _all_free(engine)


def _assert_hf_greedy(ckpt: Checkpoint, prompt: list[int], out: list[int]) -> None:
    rows = hf_logprobs(ckpt.hf, prompt + out)[len(prompt) - 1 : len(prompt) - 1 + len(out)]
    chosen = rows.gather(1, torch.tensor(out)[:, None])[:, 0]
    margin = rows.max(-1).values - chosen
    assert float(margin.max()) < TOL, float(margin.max())  # each token is the argmax (or a tie)


def test_siblings_share_full_and_window_pages(ckpt: Checkpoint) -> None:
    """n > 1 siblings start on the first one's prompt pages in both pools."""
    from specdec.sampling_params import SamplingParams

    engine = ckpt.engine(page_size=4)
    ids = random_prompts((29,), seed=17)[0]
    reqs = [engine.make_request(ids, SamplingParams(temperature=0.0, max_new_tokens=20)) for _ in range(3)]
    for r in reqs[1:]:
        r.prefix_source = reqs[0]
    for r in reqs:
        engine.scheduler.add(r)
    shared_window = False
    while engine.scheduler.has_work():
        engine.scheduler.step()
        held = [r.swa_table.held_pages for r in reqs if r.swa_table is not None and not r.finished]
        shared_window |= len(held) > 1 and bool(set(held[0]) & set(held[1]))
    assert shared_window
    assert [r.cached_tokens for r in reqs] == [0, 28, 28]  # 7 whole pages, the last prompt page not shared
    solo = _greedy(ckpt.engine(page_size=4, disable_hybrid_swa_memory=True), [ids], 20)[0]
    assert all(r.output_ids == solo for r in reqs)
    _all_free(engine)


def test_ngram_trees_with_copies_are_lossless(ckpt: Checkpoint) -> None:
    base = random_prompts((12,), seed=4)[0]
    prompts = [base * 4, base[:5] * 6]  # repetitive: the n-gram proposer drafts long chains
    plain = _greedy(ckpt.engine(page_size=4, disable_hybrid_swa_memory=True), prompts, 40)
    engine = ckpt.engine(page_size=4, speculative_algorithm="NGRAM")
    assert _greedy(engine, prompts, 40) == plain
    assert engine.metrics.spec_verify_ct > 0
    _all_free(engine)


def test_a_second_turn_reuses_full_and_window_pages(ckpt: Checkpoint, head: Path) -> None:
    kw: dict[str, Any] = {"page_size": 4, "speculative_algorithm": "EAGLE3",
                          "speculative_draft_model_path": str(head), "speculative_num_steps": 3,
                          "speculative_eagle_topk": 1, "speculative_num_draft_tokens": 4,
                          "speculative_adaptive": "off"}
    first = random_prompts((41,), seed=8)[0]
    engine = ckpt.engine(**kw)
    out1 = engine.generate(input_ids=first, sampling_params={"temperature": 0, "max_new_tokens": 20,
                                                             "ignore_eos": True})
    second = first + out1["output_ids"] + random_prompts((6,), seed=12)[0]
    out2 = engine.generate(input_ids=second, sampling_params={"temperature": 0, "max_new_tokens": 20,
                                                              "ignore_eos": True})
    cached = out2["meta_info"]["cached_tokens"]
    assert cached >= 48 and cached % CHUNK != 0  # a hit inside a chunk: its window pages came too
    fresh = ckpt.engine(**kw, disable_radix_cache=True).generate(
        input_ids=second, sampling_params={"temperature": 0, "max_new_tokens": 20, "ignore_eos": True})
    assert out2["output_ids"] == fresh["output_ids"]
    assert out2["meta_info"]["spec_accept_length"] == fresh["meta_info"]["spec_accept_length"]
    engine.scheduler.prefix_cache.allocator.check_invariants()
    engine.swa_allocator.check_invariants()
    assert engine.allocator.num_used_pages == 0 and engine.swa_allocator.num_used_pages == 0


def test_a_hit_whose_window_pages_were_reused_stops_at_a_chunk_boundary(ckpt: Checkpoint) -> None:
    engine = ckpt.engine(page_size=4, swa_full_tokens_ratio=0.05, chunked_prefill_size=8)
    first = random_prompts((37,), seed=8)[0]
    _greedy(engine, [first], 4)
    assert engine.swa_allocator.num_cached_free_pages > 0
    swa = engine.swa_allocator  # another user takes every window page: the cached ones are evicted
    taken = swa.allocate(swa.num_free_pages)
    assert taken is not None and swa.num_cached_free_pages == 0
    swa.free(taken)
    assert engine.allocator.num_cached_free_pages > 0  # the full pool's pages are still cached
    out = engine.generate(input_ids=[*first, 1, 2, 3], sampling_params={"temperature": 0, "max_new_tokens": 8})
    cached = out["meta_info"]["cached_tokens"]
    assert cached > 0 and cached % CHUNK == 0  # full pages alone, up to where no window is needed
    fresh = ckpt.engine(page_size=4, disable_radix_cache=True).generate(
        input_ids=[*first, 1, 2, 3], sampling_params={"temperature": 0, "max_new_tokens": 8})
    assert out["output_ids"] == fresh["output_ids"]


def test_preemption_when_the_window_pool_runs_out(ckpt: Checkpoint) -> None:
    """Eight requests whose windows cannot all fit: some are preempted and recomputed; each output
    equals its solo run and every page comes back."""
    prompts = random_prompts((20, 25, 30, 35, 22, 27, 31, 18), seed=21)
    engine = ckpt.engine(page_size=4, swa_full_tokens_ratio=0.04, chunked_prefill_size=8)
    assert engine.kv_plan.swa_tokens < 8 * window_pages_needed(CHUNK, 4, 8) * 4
    outs = _greedy(engine, prompts, 40)
    assert engine.metrics.preemptions > 0
    solo = ckpt.engine(page_size=4, disable_hybrid_swa_memory=True)
    assert outs == [_greedy(solo, [p], 40)[0] for p in prompts]
    engine.allocator.check_invariants()
    engine.swa_allocator.check_invariants()
    assert engine.allocator.num_used_pages == 0 and engine.swa_allocator.num_used_pages == 0


def test_prompt_logprobs_beyond_the_window_pool_are_refused(ckpt: Checkpoint) -> None:
    engine = ckpt.engine(page_size=4, swa_full_tokens_ratio=0.05, chunked_prefill_size=8)
    ids = random_prompts((engine.kv_plan.swa_tokens + 1,), seed=1)[0]
    with pytest.raises(ValueError, match="swa-full-tokens-ratio"):
        engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                        logprob_start_len=0)
    out = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 2})
    assert len(out["output_ids"]) == 2  # without prompt logprobs it is prefilled in chunks

"""Tensor parallelism on this CPU (`--tp 2` over gloo, two processes): each rank's shard against
a slice of the full checkpoint, greedy output identical to --tp 1 and to transformers on tiny
Llama 4 checkpoints (interleaved and all-MoE layers, chunked and NoPE layers), EAGLE3 on and
off, seeded sampling reproducible, weights and KV per rank ~1/2, refusals that name the size.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from specdec.distributed import free_addr
from specdec.target.config import ConfigError, ModelConfig
from specdec.target.loader import load_model
from specdec.target.tp import apply_slice, plan_shard, tensor_slice

from .spec_models import make_random_eagle3
from .tiny_models import VOCAB, Checkpoint, compare_with_hf, make_checkpoint, random_prompts

pytestmark = pytest.mark.slow

INTERLEAVED: dict[str, Any] = {
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "moe_layers": [1, 3],
    "num_experts_per_tok": 1, "attention_chunk_size": 8, "no_rope_layers": [1, 1, 0, 1], "use_qk_norm": True,
    "attn_temperature_tuning": True, "floor_scale": 8,
}
ALL_MOE: dict[str, Any] = {
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "moe_layers": [0, 1, 2],
    "num_experts_per_tok": 1, "attention_chunk_size": 16, "no_rope_layers": [1, 0, 1],
}
PROMPTS = random_prompts((6, 21, 37), seed=5)
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("tp_interleaved"), "llama4", seed=2, **INTERLEAVED)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tp_head")
    make_random_eagle3(path, target_hidden=32, vocab=VOCAB, aux_layer_ids=(0, 1, 2))
    return path


class _Rank:
    """Stands in for a TPGroup when only one rank's shard is loaded (no collectives run)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_loads_its_slice_of_every_tensor(interleaved: Checkpoint, rank: int) -> None:
    cfg = ModelConfig.from_path(interleaved.path)
    model, _ = load_model(interleaved.path, "float32", tp=_Rank(rank, 2))  # type: ignore[arg-type]
    full, _ = load_model(interleaved.path, "float32")
    shard = plan_shard(cfg, rank, 2)
    params = dict(model.named_parameters())
    D = cfg.head_dim
    for name, p in full.named_parameters():
        got = params[name]
        if name.endswith("attn.qkv.weight"):  # q heads 2r, 2r+1; the KV head r
            q, k, v = p.split((4 * D, 2 * D, 2 * D))
            want = torch.cat((q[2 * rank * D:(2 * rank + 2) * D], k[rank * D:(rank + 1) * D],
                              v[rank * D:(rank + 1) * D]))
        elif name.endswith("attn.o_proj.weight"):
            want = p[:, 2 * rank * D:(2 * rank + 2) * D]
        elif name.endswith("experts.w13"):  # [E, 2I, H]: this rank's half of gate and of up
            i = p.shape[1] // 2
            h = i // 2
            want = torch.cat((p[:, rank * h:(rank + 1) * h], p[:, i + rank * h:i + (rank + 1) * h]), dim=1)
        elif name.endswith("gate_up.weight"):  # gate rows, then up rows: this rank's half of each
            i = p.shape[0] // 2
            h = i // 2
            want = torch.cat((p[rank * h:(rank + 1) * h], p[i + rank * h:i + (rank + 1) * h]))
        elif name in ("embed_tokens.weight", "lm_head.weight"):
            want = p[rank * VOCAB // 2:(rank + 1) * VOCAB // 2]
        else:
            want = apply_slice(p, tensor_slice(shard, cfg, name, None, False))
        assert torch.equal(got, want), name
    raw = load_file(str(next(interleaved.path.glob("*.safetensors"))))
    down = raw["model.layers.0.feed_forward.down_proj.weight"]  # a dense layer's down: columns
    n = down.shape[1] // 2
    assert torch.equal(params["layers.0.feed_forward.down.weight"], down[:, rank * n:(rank + 1) * n])


@pytest.mark.parametrize("rank", [0, 1])
def test_expert_parallel_ranks_hold_their_experts_whole(interleaved: Checkpoint, rank: int) -> None:
    """--tp 2 --ep-size 2: rank r holds experts [2r, 2r + 2) of 4 whole, and the shared
    expert's half as under plain --tp; every other tensor is the --tp 2 slice."""
    cfg = ModelConfig.from_path(interleaved.path)
    model, _ = load_model(interleaved.path, "float32", tp=_Rank(rank, 2), ep_size=2)  # type: ignore[arg-type]
    tp_only, _ = load_model(interleaved.path, "float32", tp=_Rank(rank, 2))  # type: ignore[arg-type]
    full = dict(load_model(interleaved.path, "float32")[0].named_parameters())
    shard = plan_shard(cfg, rank, 2, ep=2)
    assert shard.experts == (2 * rank, 2 * rank + 2) and shard.expert_inter == (0, cfg.intermediate_size)
    theirs = dict(tp_only.named_parameters())
    for name, got in model.named_parameters():
        if name.endswith(("experts.w13", "experts.w2")):
            assert torch.equal(got, full[name][2 * rank:2 * rank + 2]), name
        else:
            assert torch.equal(got, theirs[name]), name


def test_expert_groups_split_their_experts_within_the_group(interleaved: Checkpoint) -> None:
    """--tp 4 --ep-size 2: two groups of two ranks; each group holds half the experts and
    splits each of them in two."""
    cfg = ModelConfig.from_hf_dict({**_raw(interleaved), "num_key_value_heads": 4})
    got = [(s.experts, s.expert_inter, s.inter) for s in (plan_shard(cfg, r, 4, ep=2) for r in range(4))]
    half, quarter = cfg.intermediate_size // 2, cfg.intermediate_size // 4
    assert got == [((0, 2), (0, half), (0, quarter)), ((0, 2), (half, 2 * half), (quarter, 2 * quarter)),
                   ((2, 4), (0, half), (2 * quarter, 3 * quarter)), ((2, 4), (half, 2 * half), (3 * quarter, 4 * quarter))]


def test_a_rank_reads_only_its_slices_from_the_file(interleaved: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharded tensors come through safetensors' get_slice; only replicated ones are read whole."""
    import specdec.target.loader as loader

    whole: list[str] = []
    real = loader.safe_open

    class Spy:
        def __init__(self, *a: Any, **k: Any) -> None:
            self.fh = real(*a, **k)

        def __enter__(self) -> Any:
            fh = self.fh.__enter__()

            class Handle:
                def keys(self) -> Any:
                    return fh.keys()

                def get_tensor(self, key: str) -> Any:
                    whole.append(key)
                    return fh.get_tensor(key)

                def get_slice(self, key: str) -> Any:
                    return fh.get_slice(key)

            return Handle()

        def __exit__(self, *a: Any) -> Any:
            return self.fh.__exit__(*a)

    monkeypatch.setattr(loader, "safe_open", Spy)
    load_model(interleaved.path, "float32", tp=_Rank(1, 2))  # type: ignore[arg-type]
    assert whole and all(k.endswith(("norm.weight", "router.weight")) for k in whole), whole


def test_sizes_that_do_not_divide_are_refused(interleaved: Checkpoint) -> None:
    cfg = ModelConfig.from_path(interleaved.path)
    with pytest.raises(ConfigError, match="num_attention_heads = 4 does not divide by --tp 3"):
        plan_shard(cfg, 0, 3)
    with pytest.raises(ConfigError, match="num_key_value_heads = 2 neither divides"):
        plan_shard(ModelConfig.from_hf_dict({**_raw(interleaved), "num_attention_heads": 6}), 0, 3)
    assert plan_shard(cfg, 3, 4).kv_heads == (1, 2)  # 2 KV heads over 4 ranks: replicated
    with pytest.raises(ConfigError, match="--ep-size 3 must divide --tp 2"):
        plan_shard(cfg, 0, 2, ep=3)
    with pytest.raises(ConfigError, match="num_local_experts = 3 does not divide by --ep-size 2"):
        plan_shard(ModelConfig.from_hf_dict({**_raw(interleaved), "num_local_experts": 3}), 0, 2, ep=2)
    with pytest.raises(ConfigError, match="no MoE layers"):
        plan_shard(ModelConfig.from_hf_dict({**_raw(interleaved), "moe_layers": []}), 0, 2, ep=2)


def test_an_engine_refuses_a_tp_its_model_cannot_split_and_leaves_nothing_behind(interleaved: Checkpoint,
                                                                                  tp2: Any) -> None:
    with pytest.raises(ValueError, match="num_attention_heads = 4 does not divide by --tp 3"):
        interleaved.engine(tp_size=3)
    engine = tp2()  # the process can still start a tensor-parallel engine
    assert engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["output_ids"]


def _raw(ckpt: Checkpoint) -> dict[str, Any]:
    import json

    return dict(json.loads((ckpt.path / "config.json").read_text()))


@pytest.fixture()
def tp2(interleaved: Checkpoint) -> Iterator[Any]:
    engines: list[Any] = []

    def make(ckpt: Checkpoint = interleaved, **kw: Any) -> Any:
        engine = ckpt.engine(tp_size=2, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


def test_tp2_equals_tp1_and_transformers(interleaved: Checkpoint, tp2: Any) -> None:
    engine = tp2()
    assert engine.tp is not None and engine.tp.world == 2
    compare_with_hf(engine, interleaved.hf, PROMPTS, max_new_tokens=10, tol=1e-3)
    one = interleaved.engine()
    want = [o["output_ids"] for o in one.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    assert [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)] == want
    assert engine.allocator.num_free_pages == engine.allocator.num_pages
    # weights and KV per rank: about half of one rank's (the norms and the router are replicated)
    whole = sum(p.numel() * p.element_size() for p in one.model.parameters())
    pools = [one.runner.pool] + ([one.runner.swa_pool] if one.runner.swa_pool is not None else [])
    kv_whole = sum(t.numel() * t.element_size() for pool in pools for t in (*pool.k, *pool.v))
    for f in engine.tp_footprints:
        assert 0.5 * whole <= f["weight_bytes"] < 0.56 * whole
        assert f["kv_bytes"] == kv_whole // 2


def test_tp2_ep2_equals_tp1_and_transformers_with_eagle3(interleaved: Checkpoint, head: Path, tp2: Any) -> None:
    """Whole experts per rank (--ep-size 2; vLLM's --enable-expert-parallel is the same here):
    transformers' greedy tokens, --tp 1's with EAGLE3 on, and weights per rank still ~1/2."""
    engine = tp2(ep_size=-1)
    assert engine.config.dist_config().ep_size == 2
    compare_with_hf(engine, interleaved.hf, PROMPTS, max_new_tokens=10, tol=1e-3)
    one = interleaved.engine()
    whole = sum(p.numel() * p.element_size() for p in one.model.parameters())
    for f in engine.tp_footprints:
        assert 0.5 * whole <= f["weight_bytes"] < 0.56 * whole
    engine.shutdown()
    spec = {"speculative_algorithm": "EAGLE3", "speculative_draft_model_path": str(head),
            "speculative_num_steps": 3, "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 6}
    eagle = tp2(ep_size=2, **spec)
    want = [o["output_ids"] for o in one.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    outs = eagle.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == want and all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)


def test_tp2_all_moe_layers_with_a_replicated_kv_head(tmp_path: Path, tp2: Any) -> None:
    ckpt = make_checkpoint(tmp_path, "llama4", seed=4, **ALL_MOE)
    engine = tp2(ckpt)
    assert engine.model.kv_heads == 1
    compare_with_hf(engine, ckpt.hf, PROMPTS, max_new_tokens=8, tol=1e-3)


def test_tp2_dense_llama_with_biases(tmp_path: Path, tp2: Any) -> None:
    """A dense Llama checkpoint: q/k rows permuted per head at load (each rank permutes only its
    heads' rows), attention biases (o_proj's added once)."""
    ckpt = make_checkpoint(tmp_path, "llama", seed=6, attention_bias=True)
    engine = tp2(ckpt)
    compare_with_hf(engine, ckpt.hf, PROMPTS, max_new_tokens=8, tol=1e-3)


class _CountingKernels:
    """The CPU kernel module, counting the fused layer halves --tp runs on each rank."""

    def __init__(self, ext: Any) -> None:
        self.ext, self.halves = ext, 0

    def __getattr__(self, name: str) -> Any:
        if name == "decoder_layer_attention":
            self.halves += 1
        return getattr(self.ext, name)


@pytest.mark.parametrize("quantization", [None, "w8a16"])
def test_tp2_dense_llama_runs_the_fused_cpu_layers_on_each_shard(tmp_path: Path, tp2: Any, quantization: str | None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU fast path per rank: each rank runs its heads and MLP rows through the fused layer
    halves (decoder_layer_attention / decoder_layer_mlp) with the partial sums all-reduced between
    them; float32: transformers' greedy tokens and logprobs; w8a16 (each rank quantises its shard):
    --tp 1 w8a16's greedy tokens and logprobs within 0.02."""
    import specdec.target.llama4 as llama4

    ckpt = make_checkpoint(tmp_path, "llama", seed=8, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16)
    real = llama4.fast_path
    counting: list[_CountingKernels] = []

    def fast_path(x: Any, batch: Any) -> Any:
        ext = real(x, batch)
        if ext is None:
            return None
        counting.append(_CountingKernels(ext))
        return counting[-1]

    monkeypatch.setattr(llama4, "fast_path", fast_path)
    engine = tp2(ckpt, quantization=quantization)
    assert all(layer.fused_weights() is not None for layer in engine.model.layers)
    if quantization is None:
        for prompt in PROMPTS:  # one request at a time: the fast path's batch (a batch takes the module path)
            compare_with_hf(engine, ckpt.hf, [prompt], max_new_tokens=8, tol=1e-3)
    else:
        args = {"sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True},
                "return_logprob": True}
        with ckpt.engine(quantization=quantization) as one:
            want = [one.generate(input_ids=p, **args) for p in PROMPTS]
        got = [engine.generate(input_ids=p, **args) for p in PROMPTS]
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        for g, w in zip(got, want):
            diffs = [abs(a[0] - b[0]) for a, b in zip(g["meta_info"]["output_token_logprobs"],
                                                      w["meta_info"]["output_token_logprobs"])]
            assert max(diffs) < 0.02
    # every layer of every forward ran the halves on rank 0 (prefill and 7 decode steps per prompt)
    assert sum(c.halves for c in counting) >= len(PROMPTS) * 8 * len(engine.model.layers)


def test_tp2_with_eagle3_is_lossless_and_sampling_reproducible(interleaved: Checkpoint, head: Path,
                                                               tp2: Any) -> None:
    spec = {"speculative_algorithm": "EAGLE3", "speculative_draft_model_path": str(head),
            "speculative_num_steps": 3, "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 6}
    engine = tp2(**spec)
    want = [o["output_ids"] for o in interleaved.engine().generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == want
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)
    sampled = {"temperature": 0.9, "seed": 11, "max_new_tokens": 12, "ignore_eos": True}
    first = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=sampled)]
    again = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=sampled)]
    one = interleaved.engine(**spec)
    assert first == again == [o["output_ids"] for o in one.generate(input_ids=PROMPTS, sampling_params=sampled)]


def test_the_eagle3_split_plan() -> None:
    """Which slices of the head each rank keeps, and why a head is not split (pure)."""
    from specdec.draft.eagle3_config import Eagle3Config
    from specdec.draft.eagle3_tp import plan_split, split_problem
    from specdec.target.config import RopeConfig

    cfg = Eagle3Config(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                       rms_norm_eps=1e-5, vocab_size=49152, draft_vocab_size=8192, target_hidden_size=576,
                       rope=RopeConfig(theta=1e5), tie_word_embeddings=False, aux_layer_ids=None)
    assert split_problem(cfg, 3) is None  # the shipped head's shape at --tp 3
    plans = [plan_split(cfg, r, 3) for r in range(3)]
    assert [p.heads for p in plans] == [(0, 3), (3, 6), (6, 9)] and [p.kv_heads for p in plans] == [(0, 1), (1, 2), (2, 3)]
    assert [p.vocab for p in plans] == [(0, 2731), (2731, 5462), (5462, 8193)]  # 8192 padded to 3 x 2731
    assert plans[2].fc_in == (1152, 1728) and plans[1].inter == (512, 1024)
    assert "num_attention_heads = 9 does not divide by --tp 2" in (split_problem(cfg, 2) or "")
    from dataclasses import replace
    one_kv = replace(cfg, num_heads=8, num_kv_heads=1, intermediate_size=1024)
    assert [plan_split(one_kv, r, 4).kv_heads for r in range(4)] == [(0, 1)] * 4  # replicated
    assert "neither divides" in (split_problem(replace(cfg, num_heads=6, num_kv_heads=3, intermediate_size=1024), 2)
                                 or "")


def test_tp2_splits_the_eagle3_head_over_the_ranks(interleaved: Checkpoint, head: Path, tp2: Any,
                                                   tmp_path: Path) -> None:
    """The EAGLE3 head sharded like the target (draft/eagle3_tp.py): each rank holds half of its
    heads, MLP rows, fc columns and draft vocabulary and half of its K/V; a draft forward over
    the split head (attention over each rank's draft pool, partial sums all-reduced, logits
    all-gathered) equals the whole head's, also with a draft vocabulary padded to divide; a head
    whose heads do not divide runs whole on rank 0 and stays lossless."""
    from specdec.kernels.backend import SeqAttnMeta

    spec = {"speculative_algorithm": "EAGLE3", "speculative_draft_model_path": str(head),
            "speculative_num_steps": 3, "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 6}
    engine = tp2(**spec)
    one = interleaved.engine(**spec)
    split, whole = engine.draft_model, one.draft_model
    assert split.tp is not None and (split.num_heads, split.num_kv_heads) == (2, 1)
    assert split.lm_head.weight.shape[0] == whole.cfg.draft_vocab_size // 2
    whole_bytes = sum(p.numel() * p.element_size() for name, p in whole.named_parameters()
                      if name != "_shared_embedding")  # (the target's embedding, shared)
    whole_pool = one.spec.proposer.pool
    for f in engine.tp_footprints:
        assert 0.5 * whole_bytes <= f["draft_weight_bytes"] < 0.6 * whole_bytes  # (norms and d2t replicated)
        assert f["draft_kv_bytes"] * 2 == sum(t.numel() * t.element_size() for t in (*whole_pool.k, *whole_pool.v))
    g = torch.Generator().manual_seed(3)
    n, h_t = 9, interleaved.hf.config.hidden_size
    aux = [torch.randn(n, h_t, generator=g) for _ in range(3)]
    ids = torch.randint(0, VOCAB, (n,), generator=g)
    pos = torch.arange(n)

    def draft(proposer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.inference_mode():  # the engines are idle: slots 0..n-1 are free
            x = proposer.features(aux)
            out = proposer.forward(ids, x, pos, [SeqAttnMeta(0, n, pos, pos, pos, None)], [pos])
            return x, out.hidden, proposer.logits(out.logits_hidden)

    for got, want in zip(draft(engine.spec.proposer), draft(one.spec.proposer)):
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    greedy = [o["output_ids"] for o in one.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == greedy and all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)
    engine.shutdown()
    # quantised (each rank quantises its slices; the split layer never takes the one-call kernel,
    # which quantisation used to re-enable): lossless against the same --tp 2 without speculation
    quantised = tp2(quantization="w8a16", **spec)
    assert quantised.draft_model.tp is not None and quantised.draft_model.fused_weights() is None
    outs = quantised.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    quantised.shutdown()
    plain = tp2(quantization="w8a16")
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in plain.generate(input_ids=PROMPTS,
                                                                                       sampling_params=GREEDY)]
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)
    plain.shutdown()
    odd = tmp_path / "odd_head"
    # a draft vocabulary that does not divide: ceil(63 / 2) = 32 rows each, the last one zero padding
    make_random_eagle3(odd, target_hidden=32, vocab=VOCAB, draft_vocab=63, aux_layer_ids=(0, 1, 2))
    odd_spec = dict(spec, speculative_draft_model_path=str(odd))
    engine = tp2(**odd_spec)
    assert engine.draft_model.tp is not None and engine.draft_model.lm_head.weight.shape[0] == 32
    one = interleaved.engine(**odd_spec)
    for got, want in zip(draft(engine.spec.proposer), draft(one.spec.proposer)):
        assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    engine.shutdown()
    # 3 heads do not divide by 2: the head runs whole on rank 0 (the workers hold none), lossless
    three = tmp_path / "three_heads"
    make_random_eagle3(three, target_hidden=32, vocab=VOCAB, aux_layer_ids=(0, 1, 2), num_heads=3, num_kv_heads=1)
    engine = tp2(**dict(spec, speculative_draft_model_path=str(three)))
    assert engine.draft_model.tp is None and all(f["draft_weight_bytes"] == 0 for f in engine.tp_footprints)
    want = [o["output_ids"] for o in interleaved.engine().generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == want and all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)


def test_tp_footprint_bench_reports_each_rank(interleaved: Checkpoint, head: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from specdec.bench import tp_footprint

    rc = tp_footprint.main(["--model-path", str(interleaved.path), "--speculative-draft-model-path", str(head),
                            "--tp", "2", "--max-new-tokens", "8", "--input-ids", ",".join(map(str, PROMPTS[1]))])
    out = capsys.readouterr().out
    assert rc == 0 and "EAGLE3 --tp 2 == plain --tp 2: True; == EAGLE3 --tp 1: True" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert len(rows) == 2 and all(r[4] == "(0.500)" and r[8] == "(0.500)" for r in rows)  # target and draft KV halves
    assert all(0.5 <= float(r[6].strip("()")) < 0.6 for r in rows)  # the head (norms and d2t replicated)


def test_two_nodes_on_loopback(interleaved: Checkpoint) -> None:
    """--nnodes 2: node 1 is `specdec serve --node-rank 1` (launch_server), a process of its own that runs rank 1
    and waits; the engine on node 0 meets it at --dist-init-addr."""
    addr = free_addr()
    args = ["--model-path", str(interleaved.path), "--dtype", "float32", "--skip-tokenizer-init",
            "--max-total-tokens", "1024", "--page-size", "16", "--tp", "2", "--nnodes", "2",
            "--dist-init-addr", addr, "--log-level", "warning"]
    node1 = subprocess.Popen([sys.executable, "-m", "specdec.launch_server", *args, "--node-rank", "1"])
    try:
        engine = interleaved.engine(tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr)
        want = [o["output_ids"] for o in interleaved.engine().generate(input_ids=PROMPTS, sampling_params=GREEDY)]
        assert [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)] == want
        engine.shutdown()
        assert node1.wait(timeout=60) == 0  # node 1 leaves when node 0 stops
    finally:
        if node1.poll() is None:
            node1.kill()


def test_a_tp2_server_with_adaptive_eagle3_answers_and_stops_cleanly(interleaved: Checkpoint, head: Path,
                                                                     tmp_path: Path) -> None:
    """`specdec serve --tp 2` with EAGLE3 and adaptive trees (their step costs measured through
    both ranks at start): /generate gives --tp 1's greedy tokens; on SIGINT every rank stops."""
    import time

    import httpx

    from .live_server import live_server

    def spawned() -> set[str]:
        out = subprocess.run(["pgrep", "-f", "multiprocessing.spawn"], capture_output=True, text=True).stdout
        return set(out.split())

    before = spawned()
    args = ["--model-path", str(interleaved.path), "--dtype", "float32", "--skip-tokenizer-init",
            "--max-total-tokens", "1024", "--tp", "2", "--speculative-algorithm", "EAGLE3",
            "--speculative-draft-model-path", str(head), "--log-level", "warning"]
    want = interleaved.engine().generate(input_ids=PROMPTS[1], sampling_params=GREEDY)["output_ids"]
    with live_server(args, tmp_path / "server.log") as base:
        r = httpx.post(f"{base}/generate", json={"input_ids": PROMPTS[1], "sampling_params": GREEDY}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == want
        assert httpx.get(f"{base}/get_server_info", timeout=10).json()["tp_size"] == 2
        ranks = spawned() - before
        assert ranks  # rank 1's process
    for _ in range(100):  # (live_server has sent SIGINT and waited for the server)
        if not ranks & spawned():
            break
        time.sleep(0.2)
    assert not ranks & spawned(), "a rank outlived the server"

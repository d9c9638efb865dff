"""The EAGLE3 trainer end to end on a tiny random Llama target (seconds): features + TTT
training through the CLI lower the loss; the saved head round-trips through the strict loader
(d2t included) and speculative decoding with it stays lossless (greedy)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from specdec.draft.learning_curve import kept_heads
from specdec.draft.loader import load_eagle3
from specdec.draft.train_data import choose_draft_vocab, write_jsonl
from specdec.draft.train_eagle3 import main
from specdec.draft.ttt import ChainAttention, make_draft, target_head_weight, ttt_forward
from specdec.target.loader import load_model

from .tiny_models import make_checkpoint, random_prompts

DRAFT_VOCAB = 48


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eagle3_train")
    ckpt = make_checkpoint(root / "target", "llama", num_hidden_layers=4)
    torch.manual_seed(0)
    # self-distilled responses from the tiny target (greedy, token prompts: no tokenizer)
    prompts = random_prompts([5, 7, 9, 6, 8, 4, 10, 5] * 3, seed=3)
    with ckpt.engine() as engine:
        outs: Any = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 24})
    rows = [{"key": str(i), "source": "random", "prompt": "", "temperature": 0.0, "prompt_len": len(p),
             "input_ids": p + o["output_ids"]} for i, (p, o) in enumerate(zip(prompts, outs, strict=True))]
    work, out = root / "work", root / "head"
    write_jsonl(work / "responses.jsonl", rows)
    argv = ["--recipe", "tiny", "--out", str(out), "--work-dir", str(work), "--model-path", str(ckpt.path),
            "--stages", "features,train", "--draft-vocab-size", str(DRAFT_VOCAB), "--epochs", "30",
            "--lr", "3e-3", "--ttt-steps", "3", "--no-progress", "--batch-tokens", "256", "--batch-seqs", "8",
            "--log-every", "1", "--save-every", "40", "--keep-heads", "true", "--warmup-steps", "5",
            "--threads", "1"]
    assert main(argv) == 0
    return {"target": ckpt.path, "head": out, "work": work}


def test_training_lowers_the_loss(trained: dict[str, Path]) -> None:
    log = [json.loads(line) for line in (trained["head"] / "train_log.jsonl").read_text().splitlines()]
    assert len(log) > 20
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert len(log[-1]["step_acc"]) == 3
    assert log[-1]["step_acc"][0] > log[0]["step_acc"][0]


def test_kept_heads_follow_training(trained: dict[str, Path]) -> None:
    """--keep-heads: every checkpoint's head is kept with the steps and loss tokens behind it, in
    training order, and the last one is the exported head (no validation split here)."""
    heads = kept_heads(trained["work"])
    assert len(heads) >= 3
    steps = [info["step"] for _, info in heads]
    seen = [info["tokens_seen"] for _, info in heads]
    assert steps == sorted(steps) and steps[0] == 40, steps
    assert all(b > a > 0 for a, b in itertools.pairwise(seen)), seen
    log = [json.loads(line) for line in (trained["head"] / "train_log.jsonl").read_text().splitlines()]
    assert seen[-1] == sum(r["tokens"] for r in log)  # logged every step: the same loss tokens
    with safe_open(str(heads[-1][0] / "model.safetensors"), "pt") as a, \
            safe_open(str(trained["head"] / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_features_stage_on_the_quantised_target(trained: dict[str, Path], tmp_path: Path) -> None:
    """--features-quantization w8a16: the same shards from the int8 target, its aux states
    within int8 error of float32's (and not equal: the flag is taken), statistics written."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "responses.jsonl").write_bytes((trained["work"] / "responses.jsonl").read_bytes())
    argv = ["--recipe", "tiny", "--out", str(tmp_path / "head"), "--work-dir", str(work), "--model-path",
            str(trained["target"]), "--stages", "features", "--features-quantization", "w8a16", "--no-progress",
            "--threads", "1"]
    assert main(argv) == 0
    ref = torch.load(trained["work"] / "features" / "shard_00000.pt", weights_only=True)
    got = torch.load(work / "features" / "shard_00000.pt", weights_only=True)
    assert len(got) == len(ref)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        err = float((a["aux"].float() - b["aux"].float()).norm() / a["aux"].float().norm())
        assert 0 < err < 0.05, err
    stats = json.loads((work / "features_stats.json").read_text())
    assert stats["quantization"] == "w8a16" and stats["tokens"] == sum(int(x["input_ids"].numel()) for x in got)
    assert stats["tokens_per_s"] > 0


def test_head_round_trips_through_the_loader(trained: dict[str, Path]) -> None:
    head = trained["head"]
    cfg = json.loads((head / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["draft_vocab_size"] == DRAFT_VOCAB
    target, _ = load_model(trained["target"], "float32")
    draft = load_eagle3(head, target)
    rows = [json.loads(line) for line in (trained["work"] / "responses.jsonl").read_text().splitlines()]
    hot = choose_draft_vocab(rows, DRAFT_VOCAB, target.cfg.vocab_size)
    assert torch.equal(draft.to_target_ids(torch.arange(DRAFT_VOCAB)), hot)
    with safe_open(str(head / "model.safetensors"), framework="pt") as f:
        t2d = f.get_tensor("t2d")
        d2t = f.get_tensor("d2t")
    assert t2d.dtype == torch.bool and int(t2d.sum()) == DRAFT_VOCAB and bool(t2d[hot].all())
    assert torch.equal(d2t + torch.arange(DRAFT_VOCAB), hot)
    # the trained weights survive save (bf16) + load, checkpoint vs head
    state = torch.load(trained["work"] / "ckpt" / "last.pt", weights_only=False)["model"]
    assert torch.allclose(draft.fc.weight, state["fc.weight"].to(torch.bfloat16).float())
    assert torch.allclose(draft.lm_head.weight, state["lm_head.weight"].to(torch.bfloat16).float())


def test_speculative_engine_with_the_head_is_lossless(trained: dict[str, Path]) -> None:
    import specdec

    prompts = random_prompts([6, 9, 4, 12], seed=11)
    params = {"temperature": 0, "max_new_tokens": 32}
    kw: dict[str, Any] = {"dtype": "float32", "page_size": 16, "max_total_tokens": 2048, "skip_tokenizer_init": True,
          "log_level": "warning"}
    with specdec.Engine(model_path=str(trained["target"]), **kw) as plain:
        plain_outs: Any = plain.generate(input_ids=prompts, sampling_params=params)
        ref = [o["output_ids"] for o in plain_outs]
    for steps, topk, ndraft in ((5, 4, 8), (3, 1, 4)):
        with specdec.Engine(model_path=str(trained["target"]), speculative_algorithm="EAGLE3",
                            speculative_draft_model_path=str(trained["head"]), speculative_num_steps=steps,
                            speculative_eagle_topk=topk, speculative_num_draft_tokens=ndraft, **kw) as spec:
            outs: Any = spec.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in outs] == ref
        assert sum(o["meta_info"]["spec_verify_ct"] for o in outs) > 0


def test_chain_attention_matches_the_proposers_visibility() -> None:
    """Step k at row p sees step-0 keys 0..p and its own chain keys of steps 1..k."""
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 6, 4, 2, 8
    start = 2
    attn = ChainAttention(B, T, start, H, Hkv, D**-0.5)
    qs = [torch.randn(B * T, H, D)] + [torch.randn(B * (T - start), H, D) for _ in range(2)]
    ks = [torch.randn(B * T, Hkv, D)] + [torch.randn(B * (T - start), Hkv, D) for _ in range(2)]
    vs = [torch.randn(B * T, Hkv, D)] + [torch.randn(B * (T - start), Hkv, D) for _ in range(2)]
    outs = [attn(q, k, v) for q, k, v in zip(qs, ks, vs, strict=True)]
    rep = H // Hkv

    def view(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(B, n, *x.shape[1:])

    for step in (1, 2):
        q = view(qs[step], T - start)
        for b in range(B):
            for i in range(T - start):
                p = start + i
                keys = [view(ks[0], T)[b, : p + 1]] + [view(ks[j], T - start)[b, i : i + 1] for j in range(1, step + 1)]
                vals = [view(vs[0], T)[b, : p + 1]] + [view(vs[j], T - start)[b, i : i + 1] for j in range(1, step + 1)]
                kk = torch.cat(keys).repeat_interleave(rep, dim=1)  # [n, H, D]
                vv = torch.cat(vals).repeat_interleave(rep, dim=1)
                w = torch.softmax(torch.einsum("hd,nhd->hn", q[b, i], kk) * D**-0.5, dim=-1)
                ref = torch.einsum("hn,nhd->hd", w, vv)
                assert torch.allclose(view(outs[step], T - start)[b, i], ref, atol=1e-5)


def test_make_draft_starts_at_the_targets_logit_lens(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "t", "llama", num_hidden_layers=4)
    target, _ = load_model(ckpt.path, "float32")
    hot = torch.tensor([0, 3, 5, 7, 100])
    draft = make_draft(target, hot, None, True, 0)
    assert torch.equal(draft.to_target_ids(torch.arange(5)), hot)
    # a tenth of the target rows of the draft vocabulary (see make_draft)
    assert torch.allclose(draft.lm_head.weight, 0.1 * target.lm_head.weight[hot])
    assert draft.cfg.capture_layers(4) == (2, 2, 1)


def _tiny_target_and_draft(tmp_path: Path, stride: int) -> tuple[Any, Any, torch.Tensor]:
    """A 4-layer tiny Llama target and a fresh draft whose vocabulary is every stride-th id."""
    ckpt = make_checkpoint(tmp_path / "t", "llama", num_hidden_layers=4)
    target, _ = load_model(ckpt.path, "float32")
    hot = torch.arange(0, target.cfg.vocab_size, stride)
    return target, make_draft(target, hot, None, True, 0), hot


def test_ttt_loss_matches_the_targets_distribution_row_by_row(tmp_path: Path) -> None:
    """Per step k, the loss is the mean forward KL between softmax(target hidden row p + 1 + k
    @ head rows) and the draft's logits at p, and the accuracy compares their argmaxes."""
    target, draft, hot = _tiny_target_and_draft(tmp_path, 3)
    V, H = target.cfg.vocab_size, target.cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    B, T, steps = 2, 12, 3
    lengths = torch.tensor([12, 9])
    batch = {
        "input_ids": torch.randint(0, V, (B, T), generator=g), "lengths": lengths,
        "loss_mask": torch.arange(T)[None, :].expand(B, T) >= torch.tensor([[3], [2]]),
        "top1": hot[torch.randint(0, hot.numel(), (B, T), generator=g)],
        "aux": torch.randn(B, T, 3 * H, generator=g), "hidden": torch.randn(B, T, H, generator=g),
    }
    batch["top1"][0, 7] = 1  # one target argmax outside the draft vocab: that row is not scored
    head_w = target_head_weight(target, hot)
    in_vocab = torch.zeros(V, dtype=torch.bool)
    in_vocab[hot] = True
    seen: list[torch.Tensor] = []
    plain = draft.draft_logits

    def record(h: torch.Tensor) -> torch.Tensor:
        out = plain(h)
        seen.append(out.detach())
        return out

    draft.draft_logits = record  # type: ignore[method-assign]
    with torch.no_grad():
        _, losses, accs, _ = ttt_forward(draft, batch, head_w, in_vocab, steps, 0.8)
    pos = torch.arange(T)[None, :]
    scored = torch.zeros(B, T, dtype=torch.bool)  # target row j scores token j + 1 of the response
    scored[:, :-1] = batch["loss_mask"][:, 1:] & (pos[:, 1:] < lengths[:, None])
    scored &= in_vocab[batch["top1"]]
    first = int(scored.float().argmax(-1).min())
    start = max(0, first - steps)
    assert len(seen) == steps
    for k in range(steps):
        s = 0 if k == 0 else start
        rows = [(b, p) for b in range(B) for p in range(T - s) if s + p + 1 + k < T and scored[b, s + p + 1 + k]]
        tp = torch.stack([torch.softmax(batch["hidden"][b, s + p + 1 + k] @ head_w.T, -1) for b, p in rows])
        logq = torch.log_softmax(seen[k], -1)
        kl = (tp * (tp.log() - logq)).sum(-1)
        assert losses[k] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-5)
        assert accs[k] == pytest.approx(float((seen[k].argmax(-1) == tp.argmax(-1)).float().mean()))


def test_eval_configs_parse() -> None:
    from specdec.draft.train_eagle3 import parse_eval_configs

    assert parse_eval_configs("5,4,8; 2,1,3+copy;") == [((5, 4, 8), False), ((2, 1, 3), True)]
    assert parse_eval_configs("") == []


def test_bf16_training_lowers_the_loss_with_float32_weights(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--train-dtype bfloat16: every training step's forward runs under bf16 autocast, yet the
    checkpoint's weights and the optimiser state stay float32, and training lowers the loss."""
    import shutil

    import specdec.draft.ttt as ttt

    modes: list[tuple[bool, torch.dtype]] = []
    plain = ttt.ttt_forward

    def spy(*a: Any, **k: Any) -> Any:
        modes.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return plain(*a, **k)

    monkeypatch.setattr(ttt, "ttt_forward", spy)

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(trained["work"] / "features", work / "features")
    for f in ("responses.jsonl", "features_stats.json"):
        if (trained["work"] / f).exists():
            shutil.copy(trained["work"] / f, work / f)
    argv = ["--recipe", "tiny", "--out", str(tmp_path / "head"), "--work-dir", str(work), "--model-path",
            str(trained["target"]), "--stages", "train", "--draft-vocab-size", str(DRAFT_VOCAB), "--epochs", "15",
            "--lr", "3e-3", "--ttt-steps", "3", "--no-progress", "--batch-tokens", "256", "--batch-seqs", "8",
            "--log-every", "1", "--save-every", "1000", "--warmup-steps", "5", "--threads", "1",
            "--train-dtype", "bfloat16"]
    assert main(argv) == 0
    log = [json.loads(line) for line in (tmp_path / "head" / "train_log.jsonl").read_text().splitlines()]
    assert len(modes) == log[-1]["step"] and set(modes) == {(True, torch.bfloat16)}
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    state = torch.load(work / "ckpt" / "last.pt", weights_only=False)
    floats = [v for k, v in state["model"].items() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    moments = [s["exp_avg"] for s in state["optim"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)


def test_ttt_loss_under_bf16_autocast_is_close_to_float32(tmp_path: Path) -> None:
    """The autocast forward scores the same rows with labels in float32: per-step losses within
    3 % of the float32 forward's (bf16 has 8 significant bits), the weighted loss too."""
    target, draft, hot = _tiny_target_and_draft(tmp_path, 2)
    V, H = target.cfg.vocab_size, target.cfg.hidden_size
    g = torch.Generator().manual_seed(2)
    B, T = 2, 16
    batch = {
        "input_ids": torch.randint(0, V, (B, T), generator=g), "lengths": torch.tensor([16, 11]),
        "loss_mask": torch.arange(T)[None, :].expand(B, T) >= 2,
        "top1": hot[torch.randint(0, hot.numel(), (B, T), generator=g)],
        "aux": torch.randn(B, T, 3 * H, generator=g), "hidden": torch.randn(B, T, H, generator=g),
    }
    head_w = target_head_weight(target, hot)
    in_vocab = torch.zeros(V, dtype=torch.bool)
    in_vocab[hot] = True
    with torch.no_grad():
        ref, ref_losses, _, n_ref = ttt_forward(draft, batch, head_w, in_vocab, 3, 0.8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, got_losses, _, n_got = ttt_forward(draft, batch, head_w, in_vocab, 3, 0.8)
    assert n_got == n_ref > 0
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(ref), rel=0.03)
    for a, b in zip(got_losses, ref_losses, strict=True):
        assert a == pytest.approx(b, rel=0.03)


def test_bad_train_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--train-dtype"):
        main(["--recipe", "tiny", "--out", str(tmp_path / "h"), "--work-dir", str(tmp_path / "w"),
              "--stages", "train", "--train-dtype", "float16"])


def test_keep_init_vocab_trains_on_the_init_heads_vocabulary(trained: dict[str, Path], tmp_path: Path) -> None:
    """--keep-init-vocab: the head trained from --init-head keeps its draft vocabulary (every
    lm_head row carried over) where the responses would choose another; refused without an
    init head or with a --draft-vocab-size it does not have."""
    import shutil

    from specdec.draft.train_data import read_jsonl
    from specdec.draft.ttt import export_head

    target, _ = load_model(trained["target"], "float32")
    records = read_jsonl(trained["work"] / "responses.jsonl")
    chosen = set(choose_draft_vocab(records, DRAFT_VOCAB, target.cfg.vocab_size).tolist())
    # an init head whose vocabulary the responses would not choose: half of it outside theirs
    others = [t for t in range(target.cfg.vocab_size) if t not in chosen]
    init_ids = torch.tensor(sorted(others[: DRAFT_VOCAB // 2] + sorted(chosen)[: DRAFT_VOCAB // 2]))
    init = tmp_path / "init"
    export_head(make_draft(target, init_ids, None, True, 0), init, torch.float32)

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(trained["work"] / "features", work / "features")
    shutil.copy(trained["work"] / "responses.jsonl", work / "responses.jsonl")
    base = ["--recipe", "tiny", "--work-dir", str(work), "--model-path", str(trained["target"]), "--stages", "train",
            "--draft-vocab-size", str(DRAFT_VOCAB), "--init-head", str(init), "--epochs", "2", "--ttt-steps", "3",
            "--no-progress", "--batch-tokens", "256", "--batch-seqs", "8", "--save-every", "1000", "--threads", "1"]

    def vocab(out: Path) -> list[int]:
        head = load_eagle3(out, target, dtype="float32")
        return head.to_target_ids(torch.arange(head.cfg.draft_vocab_size)).tolist()

    assert main([*base, "--out", str(tmp_path / "kept"), "--keep-init-vocab", "true"]) == 0
    assert vocab(tmp_path / "kept") == init_ids.tolist()
    info = json.loads((tmp_path / "kept" / "training_data.json").read_text())
    assert info["args"]["keep_init_vocab"] is True and info["draft_vocab_size"] == DRAFT_VOCAB
    shutil.rmtree(work / "ckpt", ignore_errors=True)
    assert main([*base, "--out", str(tmp_path / "chosen")]) == 0
    assert set(vocab(tmp_path / "chosen")) == chosen  # without the flag: the responses' own

    with pytest.raises(SystemExit, match="needs --init-head"):
        main(["--recipe", "tiny", "--out", str(tmp_path / "h"), "--work-dir", str(work), "--stages", "train",
              "--keep-init-vocab", "true"])
    with pytest.raises(SystemExit, match="draft vocabulary of 48"):
        main([*base, "--out", str(tmp_path / "h"), "--keep-init-vocab", "true", "--draft-vocab-size", "32"])

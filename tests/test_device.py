"""Device placement (`--device`): resolution, refusal without a GPU, and metadata that moves
every tensor to the model's device (checked against the meta device, since no GPU runs here)."""

from __future__ import annotations

import pytest
import torch

from specdec.engine import resolve_device
from specdec.kernels.backend import AttentionMeta, ForwardBatch, SeqAttnMeta


def test_auto_and_cpu_resolve_here() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_engine_config_rejects_unknown_devices() -> None:
    from specdec.engine_config import EngineConfig

    with pytest.raises(ValueError, match="device must be one of"):
        EngineConfig(device="tpu")
    assert EngineConfig(device="cuda:1").device == "cuda:1"


def test_attention_meta_moves_every_tensor() -> None:
    seq = SeqAttnMeta(0, 2, torch.arange(5), torch.tensor([3, 4]), torch.arange(5),
                      torch.ones(2, 5, dtype=torch.bool))
    meta = AttentionMeta(torch.tensor([3, 4]), (seq,))
    assert meta.to(torch.device("cpu")) is meta
    moved = meta.to(torch.device("meta"))
    tensors = [moved.out_slots, *[getattr(moved.seqs[0], f) for f in ("kv_slots", "q_positions",
                                                                       "kv_positions", "mask")]]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.seqs[0].q_len == 2 and moved.seqs[0].q_start == 0
    assert moved.padded is None
    # a decode batch's padded keys are built where its metadata is, when first asked for
    decode = AttentionMeta(torch.tensor([4, 12]), (
        SeqAttnMeta(0, 1, torch.arange(5), torch.tensor([4]), torch.arange(5)),
        SeqAttnMeta(1, 1, torch.arange(10, 13), torch.tensor([2]), torch.arange(3))), decode=True)
    moved = decode.to(torch.device("meta"))
    assert moved.decode and moved.padded is not None
    p = moved.padded
    assert all(t.device.type == "meta" for t in (p.index, p.valid, p.kv_positions, p.q_positions))
    assert tuple(p.index.shape) == (2, 5)


def test_a_forward_on_another_device_keeps_every_tensor_there(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No GPU runs here, so the meta device stands in for one: ops that mix a meta tensor with
    a CPU tensor raise as they would on CUDA (SDPA with a mask built on the host did, before the
    torch backend built its masks on the metadata's device). The target's prefill and tree
    verification (chunked, NoPE, QK-norm and temperature-tuned layers), a K/V commit and an
    EAGLE3 draft forward over the prompt run through the torch backend with the model, pools
    and metadata there. (Meta tensors hold no values, so logits cannot come back to the host,
    and MoE layers, which read their routing on the host, are left out.)"""
    from specdec.draft.eagle3 import Eagle3Draft
    from specdec.draft.eagle3_config import Eagle3Config
    from specdec.kernels import TorchAttentionBackend
    from specdec.kernels.kv_pool import KVPool
    from specdec.model_runner import ModelRunner
    from specdec.page_allocator import PageAllocator, PageTable
    from specdec.request import Req
    from specdec.sampling_params import SamplingParams
    from specdec.target.config import ModelConfig
    from specdec.target.llama4 import Llama4ForCausalLM
    from specdec.tree import DraftTree

    from .spec_models import make_random_eagle3
    from .tiny_models import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "t", "llama4", num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0],
                           attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True)
    make_random_eagle3(tmp_path / "d", target_hidden=32, vocab=128)
    cfg = ModelConfig.from_path(ckpt.path)
    dev = torch.device("meta")
    model = Llama4ForCausalLM(cfg).to(dev)
    draft = Eagle3Draft(Eagle3Config.from_path(tmp_path / "d"), own_embedding=False).to(dev)
    draft.share_embedding(model.embed_tokens.weight)
    pool = KVPool(cfg.num_layers, 64, cfg.num_kv_heads, cfg.head_dim, torch.float32, dev)
    runner = ModelRunner(model, pool, TorchAttentionBackend())
    assert runner.device == dev
    req = Req(rid="r", prompt_ids=list(range(11)), params=SamplingParams(), page_table=PageTable(PageAllocator(16, 4)),
              generator=None)
    assert req.reserve_kv(24)
    out = runner.extend([req], [req.prompt_ids], capture_layers=(0, 1, 2))
    assert out.hidden.device == dev and all(a.device == dev for a in out.aux_hidden)
    assert model.compute_logits(out.hidden).device == dev
    req.num_cached = 11
    verified = runner.verify_trees([req], [DraftTree(tokens=(5, 6, 7, 8), parents=(-1, 0, 0, 1))], (0, 1, 2))
    assert verified.hidden.device == dev
    runner.commit_moves(req, [(12, 11), (13, 12)])
    other = Req(rid="o", prompt_ids=[3], params=SamplingParams(), page_table=PageTable(req.page_table.allocator),
                generator=None)
    assert other.reserve_kv(4)
    runner.extend([other], [[3]])
    other.num_cached, req.num_cached = 1, 13
    assert runner.extend([req, other], [[9], [4]]).hidden.device == dev  # a padded decode batch
    feats = draft.project_features(out.aux_hidden)  # [11, H]
    draft_pool = KVPool(1, 64, draft.cfg.num_kv_heads, draft.cfg.head_dim, torch.float32, dev)
    seq = SeqAttnMeta(0, 10, req.kv_slots(10), torch.arange(10), torch.arange(10))
    batch = ForwardBatch(AttentionMeta(req.kv_slots(10), (seq,)).to(dev), draft_pool.k, draft_pool.v,
                         TorchAttentionBackend())
    h = draft(torch.tensor(req.prompt_ids[1:11], device=dev), feats[:10], torch.arange(10, device=dev), batch)
    assert h.hidden.device == dev and draft.draft_logits(h.logits_hidden).device == dev

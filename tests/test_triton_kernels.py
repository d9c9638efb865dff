"""Triton kernels against their torch references, in Triton's CPU interpreter; the Triton
backend end to end; clear start-up errors for backends that cannot run here; FlashInfer's
metadata mapping against a stand-in that implements FlashInfer's documented semantics.

The interpreter runs each program in Python (tens of ms each), so shapes are tiny and the
cases are a chosen set, not a full product. TRITON_INTERPRET must be set before the kernel
modules are imported (`@triton.jit` reads it at decoration time).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from specdec.kernels import BackendUnavailable, TorchAttentionBackend, get_attention_backend
from specdec.kernels import flashinfer_backend as fib
from specdec.kernels.backend import AttentionMeta, SeqAttnMeta
from specdec.kernels.torch_backend import attend_one
from specdec.tree import DraftTree, tree_mask
from specdec.tree import positions as tree_positions

from .spec_models import make_random_eagle3
from .tiny_models import VOCAB, Checkpoint, make_checkpoint, random_prompts

try:
    from specdec.kernels import triton_attention as ta
    from specdec.kernels import triton_moe
    from specdec.kernels.triton_kv_store import store_kv, store_kv_ref
except ImportError:  # triton is not installed: only the start-up and FlashInfer tests run
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

# ---- batches over a paged pool ------------------------------------------------------------------

# (kind, cached prefix length, query rows)
#   extend: causal prefill/extend; tree: verification of a random tree (prefix + ancestors,
#   positions prefix + depth); draft: draft-tree rows (prefix + random earlier scratch + self)
Spec = tuple[str, int, int]

ONE_TOKEN: list[Spec] = [("extend", 0, 1)]  # the very first token: kv_len 1
TREES: list[Spec] = [("tree", 13, 1), ("tree", 21, 8), ("tree", 5, 32)]
MIXED: list[Spec] = [*ONE_TOKEN, *TREES, ("extend", 10, 6), ("draft", 9, 1), ("draft", 4, 3)]
DECODE: list[Spec] = [("extend", 0, 1), ("extend", 18, 1), ("extend", 39, 1), ("draft", 7, 1)]


@dataclass
class Batch:
    meta: AttentionMeta
    q: torch.Tensor  # [T, H, D]
    k: torch.Tensor  # [T, Hkv, D] new keys
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_slots, Hkv, D]
    v_cache: torch.Tensor


def make_batch(specs: list[Spec], group: int, page_size: int, dtype: torch.dtype = torch.float32,
               hkv: int = 2, d: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    kv_lens = [c + n + (2 if kind == "draft" else 0) for kind, c, n in specs]
    num_pages = sum(math.ceil(n / page_size) for n in kv_lens) + 3
    free = torch.randperm(num_pages, generator=g).tolist()  # pages in scattered order
    seqs, out_slots, row = [], [], 0
    for (kind, c, n), kv_len in zip(specs, kv_lens):
        pages = torch.tensor([free.pop() for _ in range(math.ceil(kv_len / page_size))])
        slots = (pages[:, None] * page_size + torch.arange(page_size)).flatten()[:kv_len]
        mask: torch.Tensor | None = None
        if kind == "extend":
            q_pos = torch.arange(c, c + n)
            kv_pos = torch.arange(kv_len)
            new = torch.arange(c, c + n)
        elif kind == "tree":
            parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
            tree = DraftTree(tuple(range(n)), tuple(parents))
            q_pos = tree_positions(tree, c)
            kv_pos = torch.cat((torch.arange(c), q_pos))
            mask = torch.ones(n, kv_len, dtype=torch.bool)
            mask[:, c:] = tree_mask(tree)
            new = torch.arange(c, c + n)
        else:  # draft rows: scratch [c, c + n + 2), row i writes c + 2 + i
            mask = torch.zeros(n, kv_len, dtype=torch.bool)
            mask[:, :c] = True
            for i in range(n):
                mask[i, c : c + 2 + i] = torch.rand(2 + i, generator=g) < 0.5
                mask[i, c + 2 + i] = True
            q_pos = torch.arange(c, c + n) + 1
            kv_pos = torch.arange(kv_len)
            new = torch.arange(c + 2, c + 2 + n)
        seqs.append(SeqAttnMeta(row, n, slots, q_pos, kv_pos, mask))
        out_slots.append(slots[new])
        row += n
    num_slots = num_pages * page_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return Batch(
        AttentionMeta(torch.cat(out_slots), tuple(seqs)),
        randn(row, hkv * group, d), randn(row, hkv, d), randn(row, hkv, d),
        randn(num_slots, hkv, d), randn(num_slots, hkv, d),
    )


def reference(b: Batch, scale: float, chunk: int | None) -> torch.Tensor:
    """fp32 reference from the (possibly fp16) inputs."""
    return ta.attention_ref(b.q.float(), b.k_cache.float(), b.v_cache.float(), b.meta, scale, chunk)


TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


# ---- KV store ------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(("dtype", "cache_dtype", "page_size", "hkv"), [
    (torch.float32, torch.float32, 1, 1),
    (torch.float32, torch.float16, 16, 2),
    (torch.float16, torch.float16, 16, 4),
])
def test_store_kv_matches_reference(dtype: torch.dtype, cache_dtype: torch.dtype, page_size: int,
                                    hkv: int) -> None:
    b = make_batch(MIXED, group=1, page_size=page_size, dtype=dtype, hkv=hkv)
    k_cache, v_cache = b.k_cache.to(cache_dtype), b.v_cache.to(cache_dtype)
    # the model hands over views of a fused QKV projection: strided rows
    k = torch.cat((b.k, b.k), dim=-1)[..., : b.k.shape[-1]]
    kc, vc = k_cache.clone(), v_cache.clone()
    store_kv(k, b.v, kc, vc, b.meta.out_slots)
    store_kv_ref(k, b.v, k_cache, v_cache, b.meta.out_slots)
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)


# ---- masks ---------------------------------------------------------------------------------------


@needs_triton
def test_mask_bits_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    for q_len, kv_len, prefix in [(1, 1, 0), (3, 40, 0), (5, 70, 30), (32, 77, 45), (4, 9, 9)]:
        mask = torch.rand(q_len, kv_len, generator=g) < 0.5
        mask[:, :prefix] = True
        start, words = ta.pack_mask_bits(mask)
        assert start >= prefix
        assert words.dtype == torch.int32 and words.shape[1] == math.ceil((kv_len - start) / 32)
        assert torch.equal(ta.unpack_mask_bits(start, words, kv_len), mask)


# ---- extend / tree-verify kernel -----------------------------------------------------------------

# (dtype, GQA group, page size, chunk, BLOCK_N): chunk 8 and 6 put chunk boundaries inside
# 16-key tiles; None for BLOCK_N = the GPU default
EXTEND_CASES = [
    (torch.float32, 1, 1, None, 16),
    (torch.float32, 2, 16, 8, 16),
    (torch.float32, 4, 1, 8, 16),
    (torch.float32, 4, 16, None, None),
    (torch.float32, 2, 1, 6, None),
    (torch.float16, 2, 16, 8, 16),
    (torch.float16, 4, 1, None, 16),
]


@needs_triton
@pytest.mark.parametrize(("dtype", "group", "page_size", "chunk", "block_n"), EXTEND_CASES)
def test_extend_attention_matches_reference(dtype: torch.dtype, group: int, page_size: int,
                                            chunk: int | None, block_n: int | None) -> None:
    b = make_batch(MIXED, group, page_size, dtype, seed=group + page_size)
    cap = ta.extend_config(dtype, 8)[0]
    plan = ta.build_plan(b.meta, chunk, group, "cpu", max_block_m=cap)
    out = ta.extend_attention(b.q, b.k_cache, b.v_cache, plan, 0.35, block_n=block_n)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference(b, 0.35, chunk), atol=TOL[dtype], rtol=0)


@needs_triton
def test_extend_attention_tree_only_batches() -> None:
    """Trees of 1, 8 and 32 nodes alone (one request per call), GQA 4, chunk 8."""
    for spec in TREES:
        b = make_batch([spec], group=4, page_size=16, hkv=1)
        plan = ta.build_plan(b.meta, 8, 4, "cpu")
        out = ta.extend_attention(b.q, b.k_cache, b.v_cache, plan, 0.35, block_n=16)
        torch.testing.assert_close(out, reference(b, 0.35, 8), atol=2e-5, rtol=0)


# ---- paged decode kernel -------------------------------------------------------------------------

DECODE_CASES = [  # (dtype, group, page size, chunk, kv splits)
    (torch.float32, 1, 1, None, 1),
    (torch.float32, 2, 16, 8, 3),
    (torch.float32, 4, 1, 8, 1),
    (torch.float32, 4, 16, None, 4),
    (torch.float16, 2, 1, 8, 2),
]


@needs_triton
@pytest.mark.parametrize(("dtype", "group", "page_size", "chunk", "splits"), DECODE_CASES)
def test_decode_attention_matches_reference(dtype: torch.dtype, group: int, page_size: int,
                                            chunk: int | None, splits: int) -> None:
    b = make_batch(DECODE, group, page_size, dtype, seed=7 + group)
    plan = ta.build_plan(b.meta, chunk, group, "cpu")
    assert plan.is_decode
    out = ta.decode_attention(b.q, b.k_cache, b.v_cache, plan, 0.35, num_kv_splits=splits,
                              block_n=16)
    torch.testing.assert_close(out.float(), reference(b, 0.35, chunk), atol=TOL[dtype], rtol=0)


@needs_triton
def test_default_kv_splits() -> None:
    assert ta.default_kv_splits(1, 8, 10) == 1
    assert ta.default_kv_splits(1, 8, 4096) == 16
    assert ta.default_kv_splits(64, 8, 4096) == 1


# ---- top-1 MoE grouped GEMM ---------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_top1_grouped_gemm_matches_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    T, H, inter, E = 13, 40, 24, 4  # H, I not multiples of the tiles; expert 1 gets no token
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (0.2 * torch.randn(E, 2 * inter, H, generator=g)).to(dtype)
    w2 = (0.2 * torch.randn(E, H, inter, generator=g)).to(dtype)
    expert = torch.tensor([0, 2, 2, 3, 0, 0, 2, 2, 2, 2, 0, 3, 3])
    score = torch.rand(T, generator=g)
    out = triton_moe.moe_top1_experts(x, w13, w2, expert, score, block_m=16, block_n=32, block_k=32)
    ref = triton_moe.moe_top1_experts_ref(x.float(), w13.float(), w2.float(), expert, score)
    torch.testing.assert_close(out.float(), ref, atol=2e-5 if dtype == torch.float32 else 3e-3, rtol=0)


@needs_triton
def test_moe_align_by_expert() -> None:
    expert = torch.tensor([3, 0, 3, 3, 0])
    sorted_ids, tile_expert = triton_moe.align_by_expert(expert, 4, 2)
    n = 5  # the sentinel
    assert sorted_ids.tolist()[:6] == [1, 4, 0, 2, 3, n]
    assert set(sorted_ids.tolist()[6:]) == {n}
    assert tile_expert.tolist()[:3] == [0, 3, 3] and set(tile_expert.tolist()[3:]) == {-1}


# ---- the backend ---------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(("specs", "chunk"), [(MIXED, 8), (DECODE, None)])
def test_triton_backend_matches_torch_backend(specs: list[Spec], chunk: int | None) -> None:
    b = make_batch(specs, group=2, page_size=4)
    backend = get_attention_backend("triton")
    assert backend.name == "triton"
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    out = backend.forward(b.q, b.k, b.v, kc, vc, b.meta, 0.35, chunk)
    ref = TorchAttentionBackend().forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 0.35, chunk)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert torch.equal(kc, b.k_cache) and torch.equal(vc, b.v_cache)


@needs_triton
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize(("specs", "chunk"), [(MIXED, 8), (DECODE, None)])
def test_triton_backend_reads_and_writes_fp8_caches_as_torch_does(
        specs: list[Spec], chunk: int | None, cache_dtype: torch.dtype) -> None:
    """--kv-cache-dtype fp8: the same bytes stored, and attention over the upcast cache."""
    b = make_batch(specs, group=2, page_size=4)
    kc, vc = b.k_cache.to(cache_dtype), b.v_cache.to(cache_dtype)
    kr, vr = kc.clone(), vc.clone()
    out = get_attention_backend("triton").forward(b.q, b.k, b.v, kc, vc, b.meta, 0.35, chunk)
    ref = TorchAttentionBackend().forward(b.q, b.k, b.v, kr, vr, b.meta, 0.35, chunk)
    assert torch.equal(kc.view(torch.uint8), kr.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vr.view(torch.uint8))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


# ---- end to end ----------------------------------------------------------------------------------

E2E_TARGET: dict[str, Any] = {  # layer 0: RoPE + chunked (chunk 8) + MoE; layer 1: NoPE, full
    "num_hidden_layers": 2,
    "moe_layers": [0],
    "no_rope_layers": [1, 0],
    "attention_chunk_size": 8,
    "use_qk_norm": True,
    "attn_temperature_tuning": True,
    "floor_scale": 4,
}


@pytest.fixture(scope="module")
def e2e_target(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("target"), "llama4", seed=3, **E2E_TARGET)


@needs_triton
@pytest.mark.parametrize("speculative", [True, False])
def test_greedy_output_triton_equals_torch(e2e_target: Checkpoint, tmp_path: Path, speculative: bool) -> None:
    """EAGLE3 (prefill, tree verification, draft extend and draft-tree steps) and plain paged
    decode, through the engine: the Triton backend emits the torch backend's tokens."""
    spec: dict[str, Any] = {}
    if speculative:
        make_random_eagle3(tmp_path / "draft", 32, VOCAB, seed=1)
        spec = dict(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(tmp_path / "draft"),
                    speculative_num_steps=3, speculative_eagle_topk=2, speculative_num_draft_tokens=6)
    prompts = random_prompts((3, 11), seed=7)  # the longer prompt crosses a chunk boundary
    params = {"temperature": 0, "max_new_tokens": 8}
    outs = {}
    for backend in ("torch", "triton"):
        engine = e2e_target.engine(attention_backend=backend, page_size=4, **spec)
        assert engine.runner.backend.name == backend
        outs[backend] = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
        assert engine.allocator.num_free_pages == engine.allocator.num_pages
    assert outs["triton"] == outs["torch"]
    assert all(len(o) == 8 for o in outs["triton"])


@needs_triton
def test_the_model_s_moe_layers_run_the_triton_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`use_triton_moe` (what the engine does on a GPU) routes every top-1 MoE layer's experts
    through the grouped kernel: the same greedy tokens and logprobs as the per-expert loop."""
    ckpt = make_checkpoint(tmp_path, "llama4", num_hidden_layers=3, moe_layers=[0, 2], num_experts_per_tok=1)
    prompts = random_prompts((5, 13), seed=3)
    params = {"temperature": 0, "max_new_tokens": 6}
    engine = ckpt.engine()
    want = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    calls = []
    kernel = triton_moe.moe_top1_experts
    monkeypatch.setattr(triton_moe, "moe_top1_experts", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    assert engine.model.use_triton_moe() == 2
    got = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    assert len(calls) >= 2 * 6  # both MoE layers, every step
    for w, g in zip(want, got, strict=True):
        assert g["output_ids"] == w["output_ids"]
        lw = torch.tensor([e[0] for e in w["meta_info"]["output_token_logprobs"]])
        lg = torch.tensor([e[0] for e in g["meta_info"]["output_token_logprobs"]])
        torch.testing.assert_close(lg, lw, atol=1e-4, rtol=0)


# ---- start-up errors -----------------------------------------------------------------------------


def test_backend_selection_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_attention_backend("auto").name == "torch"
    assert get_attention_backend("torch", "cpu").name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("xformers")
    with pytest.raises(BackendUnavailable, match="FlashInfer needs a CUDA GPU; use --attention-backend torch"):
        get_attention_backend("flashinfer")
    with pytest.raises(BackendUnavailable, match="FlashInfer needs a CUDA GPU"):
        get_attention_backend("flashinfer", "cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailable, match=r"Triton kernels need a CUDA GPU.*TRITON_INTERPRET=1"):
        get_attention_backend("triton")
    with pytest.raises(BackendUnavailable, match="Triton needs a CUDA GPU"):
        get_attention_backend("triton", "cuda")


def test_engine_fails_at_start_up_with_flashinfer_on_cpu(e2e_target: Checkpoint) -> None:
    with pytest.raises(BackendUnavailable, match="FlashInfer needs a CUDA GPU"):
        e2e_target.engine(attention_backend="flashinfer")


# ---- FlashInfer metadata, against a stand-in with FlashInfer's documented semantics -------------


class _FakeWrapper:
    """page_size-1 paged attention as FlashInfer documents it: per request, keys = pages
    indices[indptr[b]:indptr[b+1]]; causal = bottom-right aligned; custom_mask = the
    row-major [qo_len, kv_len] blocks of every request, concatenated."""

    def __init__(self, workspace: torch.Tensor, layout: str, **kw: Any) -> None:
        assert layout == "NHD"
        self.plans = 0

    def plan(self, *args: Any, custom_mask: torch.Tensor | None = None, causal: bool = False,
             sm_scale: float | None = None, **kw: Any) -> None:
        # (qo_indptr,) kv_indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
        # page_size; the decode wrapper has no qo_indptr (one query per request)
        last, num_qo_heads, num_kv_heads, page = args[-5], args[-4], args[-3], args[-1]
        assert num_qo_heads % num_kv_heads == 0
        if len(args) == 8:
            self.qo_indptr, self.kv_indptr, self.indices = args[:3]
        else:
            self.kv_indptr, self.indices = args[:2]
            self.qo_indptr = torch.arange(len(self.kv_indptr), dtype=torch.int32)
            causal = False
        assert page == 1 and bool((last == 1).all())
        self.mask, self.causal, self.scale = custom_mask, causal, sm_scale
        self.plans += 1

    def run(self, q: torch.Tensor, paged: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        k_pages, v_pages = paged
        out = torch.empty_like(q)
        mask_off = 0
        for b in range(len(self.qo_indptr) - 1):
            q0, q1 = int(self.qo_indptr[b]), int(self.qo_indptr[b + 1])
            idx = self.indices[int(self.kv_indptr[b]) : int(self.kv_indptr[b + 1])].long()
            keys, values = k_pages[idx, 0], v_pages[idx, 0]
            qn, kn = q1 - q0, idx.shape[0]
            vis = None
            if self.mask is not None:
                vis = self.mask[mask_off : mask_off + qn * kn].view(qn, kn)
                mask_off += qn * kn
            elif self.causal:
                vis = torch.arange(kn)[None, :] <= torch.arange(kn - qn, kn)[:, None]
            assert self.scale is not None
            out[q0:q1] = attend_one(q[q0:q1], keys, values, vis, self.scale)
        return out


@pytest.fixture
def fake_flashinfer(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake = types.SimpleNamespace(BatchPrefillWithPagedKVCacheWrapper=_FakeWrapper,
                                 BatchDecodeWithPagedKVCacheWrapper=_FakeWrapper)
    monkeypatch.setattr(fib, "require_cuda", lambda device: None)
    monkeypatch.setattr(fib, "import_flashinfer", lambda: fake)
    monkeypatch.setattr(fib, "WORKSPACE_BYTES", 16)
    return fake


@pytest.mark.parametrize(("specs", "chunk"), [
    (DECODE, None), (DECODE, 8),  # decode wrapper; chunk window and mask rows as page lists
    ([("extend", 0, 5), ("extend", 10, 6)], None),  # causal prefill
    ([("extend", 0, 13), ("extend", 10, 6), ("extend", 3, 1)], 8),  # chunked: virtual requests
    (MIXED, None), (MIXED, 8),  # custom masks
])
def test_flashinfer_metadata_matches_torch(fake_flashinfer: Any, specs: list[Spec], chunk: int | None) -> None:
    b = make_batch(specs, group=2, page_size=4)
    backend = fib.FlashInferAttentionBackend("cpu")
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    out = backend.forward(b.q, b.k, b.v, kc, vc, b.meta, 0.35, chunk)
    out2 = backend.forward(b.q, b.k, b.v, kc, vc, b.meta, 0.35, chunk)  # planned once, reused
    ref = TorchAttentionBackend().forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 0.35, chunk)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert torch.equal(out, out2)
    assert sum(w.plans for w in backend._wrappers.values()) == 1

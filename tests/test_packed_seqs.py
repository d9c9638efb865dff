"""Several requests in one C++ call (`paged_attention_seqs`, `decoder_stack_seqs`,
`eagle3_layer_seqs`): a batch of decodes, trees and short chunks packed row after row. Each
request's rows, and the K/V it writes, equal the same kernel on that request alone, bitwise (what
keeps batched speculation lossless and a request's output independent of its neighbours); the
model and the draft take the packed call for a batch and agree with their module paths."""

from __future__ import annotations

import pytest
import torch

from specdec.kernels import cpu_kernels as ck
from specdec.kernels.backend import AttentionMeta, ForwardBatch, SeqAttnMeta

kernels = ck.extension()
pytestmark = pytest.mark.skipif(kernels is None, reason=f"CPU kernels unavailable: {ck.unsupported_reason()}")

NO_MASK = ck.NO_MASK


# (context, new rows, masked) per request: a decode, a tree, a causal chunk, another decode
REQUESTS = ((9, 1, False), (6, 4, True), (3, 5, False), (30, 1, False))


def _seqs(g: torch.Generator, S: int) -> tuple[list[SeqAttnMeta], torch.Tensor]:
    """Packed requests over disjoint scattered slots of a pool of S; returns them and out_slots."""
    perm = torch.randperm(S, generator=g)
    seqs, start, used = [], 0, 0
    for ctx, n, masked in REQUESTS:
        slots = perm[used : used + ctx + n].contiguous()
        used += ctx + n
        mask = None
        if masked:  # each node sees the context, itself and some earlier nodes
            tail = torch.tril(torch.rand(n, n, generator=g) < 0.6) | torch.eye(n, dtype=torch.bool)
            mask = torch.cat((torch.ones(n, ctx, dtype=torch.bool), tail), dim=1)
        q_pos = torch.arange(ctx, ctx + n)
        seqs.append(SeqAttnMeta(start, n, slots, q_pos, torch.arange(ctx + n), mask))
        start += n
    return seqs, torch.cat([s.kv_slots[-s.q_len :] for s in seqs])


def _args(seqs: list[SeqAttnMeta]) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    return ([s.q_start for s in seqs] + [seqs[-1].q_start + seqs[-1].q_len], [s.kv_slots for s in seqs],
            [NO_MASK if s.mask is None else s.mask.contiguous() for s in seqs])


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize(("H", "Hkv", "D"), [(9, 3, 64), (4, 2, 16), (4, 4, 12)])
def test_paged_attention_seqs_equals_each_request_alone(kv_dtype: torch.dtype, H: int, Hkv: int, D: int) -> None:
    if kv_dtype != torch.float32 and D % 8:
        pytest.skip("fp8 caches need a head dim that is a multiple of 8")
    g = torch.Generator().manual_seed(H * 100 + D)
    S = 160
    k_cache = torch.randn(S, Hkv, D, generator=g).to(kv_dtype)
    v_cache = torch.randn(S, Hkv, D, generator=g).to(kv_dtype)
    seqs, _ = _seqs(g, S)
    T = sum(s.q_len for s in seqs)
    q = torch.randn(T, H, D, generator=g)
    starts, slots, masks = _args(seqs)
    got = kernels.paged_attention_seqs(q, k_cache, v_cache, starts, slots, masks, 0.125)
    for s, sl, m in zip(seqs, slots, masks):
        rows = slice(s.q_start, s.q_start + s.q_len)
        alone = kernels.paged_attention(q[rows].contiguous(), k_cache, v_cache, sl, m, 0.125)
        assert torch.equal(got[rows], alone)
        ref = ck.paged_attention_reference(q[rows], k_cache.float(), v_cache.float(), sl, s.mask, 0.125)
        assert (got[rows] - ref).abs().max().item() <= 2e-5 * max(1.0, ref.abs().max().item())


def test_paged_attention_seqs_refuses_bad_packing() -> None:
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(40, 2, 16, generator=g)
    q = torch.randn(5, 4, 16, generator=g)
    slots = [torch.arange(0, 6), torch.arange(10, 14)]
    with pytest.raises(RuntimeError, match="from 0 to T"):
        kernels.paged_attention_seqs(q, cache, cache, [0, 2, 4], slots, [NO_MASK, NO_MASK], 1.0)
    with pytest.raises(RuntimeError, match="has no rows"):
        kernels.paged_attention_seqs(q, cache, cache, [0, 0, 5], slots, [NO_MASK, NO_MASK], 1.0)
    with pytest.raises(RuntimeError, match="B masks"):
        kernels.paged_attention_seqs(q, cache, cache, [0, 2, 5], slots, [NO_MASK], 1.0)
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.paged_attention_seqs(q, cache, cache, [0, 2, 5], [slots[0], torch.tensor([3, 40])],
                                     [NO_MASK, NO_MASK], 1.0)
    with pytest.raises(RuntimeError, match=r"masks\[1\]"):
        kernels.paged_attention_seqs(q, cache, cache, [0, 2, 5], slots,
                                     [NO_MASK, torch.ones(2, 4, dtype=torch.bool)], 1.0)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    from .tiny_models import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("packed") / "t", "llama", seed=5, hidden_size=64,
                           intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.mark.parametrize("quantization", [None, "w8a16", "w4a16"])
def test_decoder_stack_seqs_equals_each_request_alone(tiny_target, quantization) -> None:
    """Every layer over four packed requests == decoder_stack on each alone: hidden, captured
    layer inputs and every layer's K/V writes, bitwise with the integer kernels (float32 weights go
    through oneDNN, whose rounding may change with the row count: 1e-5 there)."""
    with tiny_target.engine(quantization=quantization) as engine:
        model = engine.model
        stack = model._stack_weights()
        assert stack is not None
        a0 = model.layers[0].attn
        L, S = len(model.layers), 160
        g = torch.Generator().manual_seed(1)
        shape = (S, a0.num_kv_heads, a0.head_dim)
        k0 = [torch.randn(shape, generator=g) for _ in range(L)]  # the requests' earlier context
        v0 = [torch.randn(shape, generator=g) for _ in range(L)]
        seqs, out_slots = _seqs(g, S)
        T = sum(s.q_len for s in seqs)
        x = torch.randn(T, model.cfg.hidden_size, generator=g)
        pos = torch.cat([s.q_positions for s in seqs])
        rope = torch.view_as_real(model.rotary.cis(pos)).contiguous()
        w, cap = list(stack.weights), [0, 1, L]

        def run(xs, ropes, outs, starts, slots, masks, k, v):
            return kernels.decoder_stack_seqs(xs, ropes, w, k, v, a0.eps, a0.num_heads, a0.num_kv_heads,
                                              a0.head_dim, outs, starts, slots, masks, a0.scale, cap, stack.act_bits)

        kb, vb = [t.clone() for t in k0], [t.clone() for t in v0]
        got = run(x, rope, out_slots, *_args(seqs), kb, vb)
        for s in seqs:
            rows = slice(s.q_start, s.q_start + s.q_len)
            ka, va = [t.clone() for t in k0], [t.clone() for t in v0]
            alone = kernels.decoder_stack(x[rows].contiguous(), rope[rows].contiguous(), w, ka, va, a0.eps,
                                          a0.num_heads, a0.num_kv_heads, a0.head_dim, out_slots[rows].contiguous(),
                                          s.kv_slots, NO_MASK if s.mask is None else s.mask.contiguous(), a0.scale,
                                          cap, stack.act_bits)
            mine = out_slots[rows]
            pairs = [(a[rows], b) for a, b in zip(got, alone)]
            pairs += [(kb[i][mine], ka[i][mine]) for i in range(L)] + [(vb[i][mine], va[i][mine]) for i in range(L)]
            for a, b in pairs:
                if quantization is None:
                    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
                else:
                    assert torch.equal(a, b)


def _decode_batch(model, pool, backend, lens: list[int], g: torch.Generator):
    """A plain decode step of len(lens) requests (context lens[b] - 1 already in the pool), as the
    scheduler builds it: one causal row each, marked a decode batch."""
    seqs, out, at = [], [], 0
    for b, n in enumerate(lens):
        slots = torch.arange(at, at + n)
        at += n + 3
        seqs.append(SeqAttnMeta(b, 1, slots, torch.tensor([n - 1]), torch.arange(n), None))
        out.append(slots[-1:])
    out_slots = torch.cat(out)
    for i in range(len(model.layers)):  # earlier context
        pool.k[i].copy_(torch.randn(pool.k[i].shape, generator=g))
        pool.v[i].copy_(torch.randn(pool.v[i].shape, generator=g))
    return ForwardBatch(AttentionMeta(out_slots, tuple(seqs), decode=True), pool.k, pool.v, backend,
                        capture_layers=(0, 2)), torch.tensor([n - 1 for n in lens])


def test_a_decode_batch_pads_its_keys_only_when_asked() -> None:
    """The padded view of a decode batch (the module path's batched attention) holds every
    request's slots and positions left-aligned; it is built on first use, so the fused path, which
    reads the packed seqs, never pays for it. A batch with a tree or a chunk is no decode batch."""
    from specdec.kernels.backend import pad_decode

    seqs = (SeqAttnMeta(0, 1, torch.tensor([7, 8, 9]), torch.tensor([2]), torch.arange(3)),
            SeqAttnMeta(1, 1, torch.tensor([20]), torch.tensor([0]), torch.arange(1)))
    meta = AttentionMeta(torch.tensor([9, 20]), seqs, decode=True)
    assert meta._padded == []
    p = meta.padded
    assert p is not None and meta.padded is p and meta._padded == [p]
    assert p.index.tolist() == [[7, 8, 9], [20, 0, 0]]
    assert p.valid.tolist() == [[True, True, True], [True, False, False]]
    assert p.kv_positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert p.q_positions.tolist() == [2, 0]
    assert pad_decode(seqs).index.tolist() == p.index.tolist()
    assert AttentionMeta(torch.tensor([9, 20]), seqs).padded is None
    chunk = SeqAttnMeta(0, 2, torch.arange(4), torch.tensor([2, 3]), torch.arange(4))
    with pytest.raises(ValueError, match="one causal query per request"):
        AttentionMeta(torch.arange(2), (chunk,), decode=True)


def test_a_decode_batch_takes_one_stack_call_and_matches_the_module_path(tiny_target, monkeypatch) -> None:
    """The model's forward over a batch of decodes (marked a decode batch, as the scheduler builds
    it) runs decoder_stack_seqs once, never builds the padded view, and agrees with the module
    path (which builds it) within 1e-4."""
    import specdec.target.llama4 as llama4

    with tiny_target.engine(quantization="w8a16") as engine:
        model, pool, backend = engine.model, engine.kv_pool, engine.runner.backend
        ids = torch.tensor([3, 7, 11, 19, 23])

        def forward() -> list[torch.Tensor]:
            batch, pos = _decode_batch(model, pool, backend, [4, 17, 1, 40, 9], torch.Generator().manual_seed(2))
            with torch.inference_mode():
                out = model(ids, pos, batch)
            return [out.hidden, *out.aux_hidden, pool.k[1][batch.attn.out_slots].clone()]

        calls = []
        real = llama4.packed_seqs
        monkeypatch.setattr(llama4, "packed_seqs", lambda b: calls.append(len(b.attn.seqs)) or real(b))
        got = forward()
        assert calls == [5]
        batch, _ = _decode_batch(model, pool, backend, [4, 17], torch.Generator().manual_seed(2))
        with torch.inference_mode():
            model(ids[:2], torch.tensor([3, 16]), batch)
        assert batch.attn._padded == []  # the fused path never built the padded view
        monkeypatch.setattr(llama4, "fast_path", lambda x, b: None)
        ref = forward()
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_a_batch_decodes_as_each_request_alone(tiny_target) -> None:
    """Through the engine: greedy output and its logprobs for three prompts decoded together equal
    each prompt decoded alone, bitwise (the fused path at every batch size)."""
    from .tiny_models import random_prompts

    prompts = random_prompts((5, 17, 40), seed=8)
    params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    with tiny_target.engine(quantization="w8a16") as engine:
        together = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
        alone = [engine.generate(input_ids=p, sampling_params=params, return_logprob=True) for p in prompts]
    for t, a in zip(together, alone):
        assert t["output_ids"] == a["output_ids"]
        assert t["meta_info"]["output_token_logprobs"] == a["meta_info"]["output_token_logprobs"]


@pytest.mark.parametrize("quantization", [None, "w8a16"])
def test_eagle3_layer_seqs_equals_each_request_alone(quantization) -> None:
    from .tiny_models import tiny_eagle3_draft

    draft = tiny_eagle3_draft(9, quantization)
    cfg = draft.cfg
    g = torch.Generator().manual_seed(10)
    fused = draft.fused_weights()
    assert fused is not None
    S = 160
    k0, v0 = torch.randn(S, 2, 16, generator=g), torch.randn(S, 2, 16, generator=g)
    seqs, out_slots = _seqs(g, S)
    T = sum(s.q_len for s in seqs)
    emb, feat = torch.randn(T, 64, generator=g), torch.randn(T, 64, generator=g)
    rope = torch.view_as_real(draft.rotary.cis(torch.cat([s.q_positions for s in seqs]))).contiguous()
    args = (*fused.weights, cfg.rms_norm_eps, 4, 2, 16)
    kb, vb = k0.clone(), v0.clone()
    got = kernels.eagle3_layer_seqs(emb, feat, rope, *args, kb, vb, out_slots, *_args(seqs), draft.scale,
                                    fused.act_bits)
    for s in seqs:
        rows = slice(s.q_start, s.q_start + s.q_len)
        ka, va = k0.clone(), v0.clone()
        alone = kernels.eagle3_layer(emb[rows].contiguous(), feat[rows].contiguous(), rope[rows].contiguous(), *args,
                                     ka, va, out_slots[rows].contiguous(), s.kv_slots,
                                     NO_MASK if s.mask is None else s.mask.contiguous(), draft.scale, fused.act_bits)
        for a, b in ((got[rows], alone), (kb[out_slots[rows]], ka[out_slots[rows]])):
            if quantization is None:  # oneDNN's float32 rounding may change with the row count
                assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
            else:
                assert torch.equal(a, b)

"""specdec's C++ CPU kernels against their torch references (float64 inside)."""

from __future__ import annotations

import pytest
import torch

from specdec.kernels import cpu_kernels as ck

kernels = ck.extension()  # the active tier's (SPECDEC_CPU_ISA; test_cpu_tiers.py runs every tier)
pytestmark = pytest.mark.skipif(kernels is None, reason=f"CPU kernels unavailable: {ck.unsupported_reason()}")

TOL = 2e-5  # relative to the largest output magnitude (float32 accumulation vs float64)


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape
    if ref.numel() == 0:
        return
    assert (y - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())


def test_pack_round_trip() -> None:
    tile = ck.w8_tile()  # channels per tile of the active tier's layout (8 or 16)
    w = torch.randint(-127, 128, (5, 128), dtype=torch.int8)
    packed = ck.pack_w8(w)
    assert packed.shape == (tile, 128)  # N padded to a whole tile
    assert not torch.equal(packed[:5], w)
    assert torch.equal(ck.unpack_w8(packed, 5), w)
    odd = torch.randint(-127, 128, (3, 40), dtype=torch.int8)  # K padded to 64 with zero columns
    packed = ck.pack_w8(odd)
    assert packed.shape == (tile, 64)
    assert torch.equal(ck.unpack_w8(packed, 3, 40), odd)
    assert not ck.unpack_w8(packed, 3)[:, 40:].any()
    for isa in ck.W8_TILE:  # every tier's layout round-trips, whichever tier runs
        assert torch.equal(ck.unpack_w8(ck.pack_w8(odd, isa), 3, 40, isa=isa), odd)


@pytest.mark.parametrize("M", [0, 1, 2, 3, 4, 8, 17])
@pytest.mark.parametrize(("N", "K"), [(4, 32), (7, 64), (24, 96), (5, 40), (9, 100), (960, 576), (576, 1536)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act_bits", [16, 8])
def test_w8_linear(M: int, N: int, K: int, bias: bool, act_bits: int) -> None:
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    scale = torch.rand(N, generator=g) * 0.01
    b = torch.randn(N, generator=g) if bias else None
    _close(ck.w8_linear(x, ck.pack_w8(w), scale, b, act_bits), ck.w8_linear_reference(x, w, scale, b, act_bits))


@pytest.mark.parametrize("act_bits", [16, 8])
def test_w8_linear_activation_rounding_is_small(act_bits: int) -> None:
    """int16 (or int8) activations per block (one block all zero, one of 1e-36, one with a 1000x
    outlier) stay within the rounding bound of the float product on the dequantised weight: each
    k is off by at most half its block's step amax / qmax (qmax 32767 or 127; plus float32
    accumulation)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 576, generator=g)
    x[:, 32:64] = 0.0
    x[2, 64:96] = 1e-36  # a denormal-scale block: treated as zero, not overflowed
    x[1, 100] = 1000.0
    w = torch.randint(-127, 128, (64, 576), dtype=torch.int8, generator=g)
    scale = torch.rand(64, generator=g) * 0.01
    wd = w.double() * scale.double()[:, None]
    exact = x.double() @ wd.T
    y = ck.w8_linear(x, ck.pack_w8(w), scale, act_bits=act_bits)
    block, qmax = ck.act_block(576, act_bits), ck.act_qmax(act_bits)
    step = x.abs().view(3, -1, block).amax(-1).double().repeat_interleave(block, 1) / qmax  # [3, 576]
    bound = (step / 2) @ wd.abs().T + 1e-6 * exact.abs().max()
    assert bool(((y.double() - exact).abs() <= bound).all())
    # int16 codes: within 2e-4 of the largest output; int8 codes are 258x coarser
    assert (y.double() - exact).abs().max().item() <= (2e-4 if act_bits == 16 else 3e-2) * exact.abs().max().item()


@pytest.mark.parametrize("act_bits", [16, 8])
def test_w8_linear_rows_do_not_depend_on_batch(act_bits: int) -> None:
    """Row m of an M-row product is bit-identical to the same row alone (verification of M
    draft tokens must reproduce single-token decoding exactly)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(11, 576, generator=g)
    w = ck.pack_w8(torch.randint(-127, 128, (200, 576), dtype=torch.int8, generator=g))
    scale = torch.rand(200, generator=g) * 0.01
    full = ck.w8_linear(x, w, scale, act_bits=act_bits)
    for m in range(11):
        assert torch.equal(full[m : m + 1], ck.w8_linear(x[m : m + 1], w, scale, act_bits=act_bits))


def test_w8_linear_rejects_bad_inputs() -> None:
    w = ck.pack_w8(torch.zeros(4, 32, dtype=torch.int8))  # packed K = 64
    with pytest.raises(RuntimeError, match="K="):
        ck.w8_linear(torch.zeros(1, 96), w, torch.ones(4))
    with pytest.raises(RuntimeError, match="float32"):
        ck.w8_linear(torch.zeros(1, 32, dtype=torch.float64), w, torch.ones(4))
    with pytest.raises(RuntimeError, match="rows"):
        ck.w8_linear(torch.zeros(1, 32), w, torch.ones(ck.w8_tile() + 1))  # need two tiles of rows
    with pytest.raises(RuntimeError, match="act_bits must be 8 or 16"):
        ck.w8_linear(torch.zeros(1, 32), w, torch.ones(4), act_bits=4)


def _w4(N: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g)
    scale, low = torch.rand(N, K // 32, generator=g) * 0.02, -torch.rand(N, K // 32, generator=g) * 0.15
    wq, ws = ck.pack_w4(q, scale, low)
    # the logical weight: scale * q + low with float16 scale and low
    expect = q.float() * scale.half().float().repeat_interleave(32, 1) + low.half().float().repeat_interleave(32, 1)
    assert torch.equal(ck.unpack_w4(wq, ws, N), expect)
    for isa in ck.W4_TILE:  # every tier's layout round-trips, whichever tier runs
        assert torch.equal(ck.unpack_w4(*ck.pack_w4(q, scale, low, isa), N, isa=isa), expect)
    return wq, ws


@pytest.mark.parametrize("M", [0, 1, 2, 3, 5, 8])
@pytest.mark.parametrize(("N", "K"), [(8, 64), (13, 128), (960, 576), (576, 1536)])
def test_w4_linear(M: int, N: int, K: int) -> None:
    wq, ws = _w4(N, K, seed=N + K)
    assert wq.shape == (-(-N // ck.w4_tile()) * ck.w4_tile(), K // 2)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    b = torch.randn(N)
    _close(ck.w4_linear(x, wq, ws, N, b), ck.w4_linear_reference(x, wq, ws, N, b))


def test_w4_linear_rows_do_not_depend_on_batch_and_bad_inputs_are_refused() -> None:
    wq, ws = _w4(40, 128, seed=3)
    x = torch.randn(7, 128)
    full = ck.w4_linear(x, wq, ws, 40)
    for m in range(7):
        assert torch.equal(full[m : m + 1], ck.w4_linear(x[m : m + 1], wq, ws, 40))
    with pytest.raises(RuntimeError, match="pack_w4"):
        ck.w4_linear(torch.zeros(1, 64), wq, ws, 40)  # K does not match
    with pytest.raises(RuntimeError, match="pack_w4"):
        ck.w4_linear(x, wq, ws, 50)  # more channels than packed
    with pytest.raises(ValueError, match="64-aligned"):
        ck.pack_w4(torch.zeros(8, 48, dtype=torch.long), torch.ones(8, 1), torch.zeros(8, 1))


@pytest.mark.parametrize(("T", "H"), [(1, 576), (3, 576), (8, 32)])
def test_rms_norm(T: int, H: int) -> None:
    x, w = torch.randn(T, H) * 3, torch.rand(H) + 0.5
    _close(kernels.rms_norm(x, w, 1e-5), ck.rms_norm_reference(x, w, 1e-5))


@pytest.mark.parametrize("D", [64, 40, 12])  # grouped path (D % 8 == 0, a partial 32-chunk), generic path
@pytest.mark.parametrize(("H", "Hkv"), [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize(("T", "L", "masked"), [(1, 1, False), (1, 40, False), (5, 5, False),
                                                  (8, 50, True), (32, 70, True)])
def test_paged_attention(H: int, Hkv: int, T: int, L: int, masked: bool, D: int) -> None:
    g = torch.Generator().manual_seed(T * 100 + L + H + D)
    S = 128
    k_cache, v_cache = torch.randn(S, Hkv, D, generator=g), torch.randn(S, Hkv, D, generator=g)
    q = torch.randn(T, H, D, generator=g)
    slots = torch.randperm(S, generator=g)[:L]
    mask = None
    if masked:
        mask = torch.rand(T, L, generator=g) < 0.4
        mask[:, 0] = True
        mask[T // 2] = False  # a query that sees nothing gets zeros
    empty = torch.empty(0, dtype=torch.bool)
    y = kernels.paged_attention(q, k_cache, v_cache, slots, empty if mask is None else mask, 0.125)
    _close(y, ck.paged_attention_reference(q, k_cache, v_cache, slots, mask, 0.125))
    if masked:
        assert torch.count_nonzero(y[T // 2]) == 0


@pytest.mark.parametrize("D", [64, 128])
def test_paged_attention_rows_do_not_depend_on_the_others(D: int) -> None:
    """Each query row (tree verification) equals the same query alone with its mask row
    (decoding): rows share work items in the grouped kernel but not arithmetic."""
    g = torch.Generator().manual_seed(D)
    k_cache, v_cache = torch.randn(100, 3, D, generator=g), torch.randn(100, 3, D, generator=g)
    q = torch.randn(7, 9, D, generator=g)
    slots = torch.randperm(100, generator=g)[:60]
    mask = torch.rand(7, 60, generator=g) < 0.7
    mask[:, :50] = True
    full = kernels.paged_attention(q, k_cache, v_cache, slots, mask, 0.125)
    for t in range(7):
        alone = kernels.paged_attention(q[t : t + 1].contiguous(), k_cache, v_cache, slots,
                                        mask[t : t + 1].contiguous(), 0.125)
        assert torch.equal(full[t : t + 1], alone)


@pytest.mark.parametrize(("H", "Hkv", "D"), [(9, 3, 64), (8, 1, 40), (4, 4, 128)])
def test_paged_attention_batch_equals_each_request_alone(H: int, Hkv: int, D: int) -> None:
    """A decode batch (one query per request, padded slot rows of different lengths) equals
    paged_attention on each request alone, bitwise, and the float64 reference within TOL."""
    g = torch.Generator().manual_seed(H + D)
    S, lens = 200, [1, 37, 8, 120, 64]
    k_cache, v_cache = torch.randn(S, Hkv, D, generator=g), torch.randn(S, Hkv, D, generator=g)
    q = torch.randn(len(lens), H, D, generator=g)
    index = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for b, n in enumerate(lens):
        index[b, :n] = torch.randperm(S, generator=g)[:n]
    y = kernels.paged_attention_batch(q, k_cache, v_cache, index, torch.tensor(lens), 0.125)
    empty = torch.empty(0, dtype=torch.bool)
    for b, n in enumerate(lens):
        slots = index[b, :n].contiguous()
        alone = kernels.paged_attention(q[b : b + 1].contiguous(), k_cache, v_cache, slots, empty, 0.125)
        assert torch.equal(y[b : b + 1], alone)
        _close(y[b : b + 1], ck.paged_attention_reference(q[b : b + 1], k_cache, v_cache, slots, None, 0.125))
    with pytest.raises(RuntimeError, match="outside 1"):
        kernels.paged_attention_batch(q, k_cache, v_cache, index, torch.tensor([0, 1, 1, 1, 1]), 0.125)
    bad = index.clone()
    bad[1, 3] = S
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.paged_attention_batch(q, k_cache, v_cache, bad, torch.tensor(lens), 0.125)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize(("T", "D"), [(1, 64), (5, 40), (9, 128)])
def test_paged_attention_reads_fp8_caches_exactly(fp8: torch.dtype, T: int, D: int) -> None:
    """--kv-cache-dtype fp8: the kernels upcast on load; the result is bitwise the kernel's over
    the caches upcast by torch (every byte value, subnormals and the largest included)."""
    g = torch.Generator().manual_seed(T + D)
    S, Hkv, H = 300, 2, 6
    every = torch.arange(256, dtype=torch.uint8)
    finite = every[every.view(fp8).float().isfinite()]  # NaN / inf codes are never stored
    codes = finite.repeat(S * Hkv * D // len(finite) + 1)[: S * Hkv * D]
    k_cache = codes[torch.randperm(codes.numel(), generator=g)].view(S, Hkv, D).view(fp8)
    slots = torch.randperm(S, generator=g)[:40]
    v_cache = torch.randn(S, Hkv, D, generator=g).clamp(-400, 400).to(fp8)
    q = torch.randn(T, H, D, generator=g) * 0.01
    mask = torch.rand(T, 40, generator=g) < 0.7
    mask[:, 0] = True
    ref = kernels.paged_attention(q, k_cache.float(), v_cache.float(), slots, mask, 0.125)
    assert torch.equal(kernels.paged_attention(q, k_cache, v_cache, slots, mask, 0.125), ref)
    index = slots[None, :].repeat(T, 1).contiguous()
    lens = torch.full((T,), 40, dtype=torch.long)
    batch_ref = kernels.paged_attention_batch(q, k_cache.float(), v_cache.float(), index, lens, 0.125)
    assert torch.equal(kernels.paged_attention_batch(q, k_cache, v_cache, index, lens, 0.125), batch_ref)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernels.paged_attention(q, k_cache, v_cache.float(), slots, mask, 0.125)


def test_paged_attention_rejects_slots_outside_the_pool() -> None:
    cache = torch.zeros(4, 1, 8)
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.paged_attention(torch.zeros(1, 1, 8), cache, cache, torch.tensor([0, 9]),
                                torch.empty(0, dtype=torch.bool), 1.0)


# ---- the one-call decoder layer against the module path, through the engine ------------------
@pytest.mark.parametrize("quantization", [None, "w8a16", "w8a8_int8", "w4a16"])
def test_fused_decoder_layer_matches_the_module_path(tmp_path, monkeypatch, quantization) -> None:
    import specdec.target.llama4 as llama4

    from .tiny_models import make_checkpoint, random_prompts

    # dense Llama, every K a multiple of 32 so w8a16 weights take the AVX2 kernel
    target = make_checkpoint(tmp_path / "t", "llama", seed=2, hidden_size=64, intermediate_size=96,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    prompts = random_prompts((5, 17, 40), seed=4)
    params = {"temperature": 0, "max_new_tokens": 12}

    def run() -> tuple[list[list[int]], list[float]]:
        with target.engine(quantization=quantization) as engine:
            outs = engine.generate(input_ids=prompts, sampling_params=params)
            lp = engine.generate(input_ids=prompts[2], sampling_params={"temperature": 0, "max_new_tokens": 1},
                                 return_logprob=True, logprob_start_len=0)
            layers = list(engine.model.layers)
        return [o["output_ids"] for o in outs], [v for v, _, _ in lp["meta_info"]["input_token_logprobs"][1:]], layers

    calls = []
    real = llama4.fast_path
    monkeypatch.setattr(llama4, "fast_path", lambda x, b: calls.append(1) or real(x, b))
    fused_ids, fused_lp, layers = run()
    assert calls and all(layer.fused_weights() is not None for layer in layers)
    monkeypatch.setattr(llama4, "fast_path", lambda x, b: None)
    ref_ids, ref_lp, _ = run()
    assert fused_ids == ref_ids
    assert max(abs(a - b) for a, b in zip(fused_lp, ref_lp)) < 1e-4


def test_decoder_stack_returns_the_captured_layer_inputs(tmp_path, monkeypatch) -> None:
    """One call for all layers (decoder_stack) == the module path, including the captured
    inputs of layers 0, 1 and L (the final hidden) that EAGLE3 reads."""
    import specdec.target.llama4 as llama4
    from specdec.kernels.backend import AttentionMeta, ForwardBatch, SeqAttnMeta

    from .tiny_models import make_checkpoint

    target = make_checkpoint(tmp_path / "t", "llama", seed=3, hidden_size=64, intermediate_size=96,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with target.engine(quantization="w8a16") as engine:
        model, pool, backend = engine.model, engine.kv_pool, engine.runner.backend
        L = len(model.layers)
        assert model._stack_weights() is not None
        ids, pos = torch.randint(0, 100, (7,), generator=torch.Generator().manual_seed(0)), torch.arange(7)

        def forward() -> tuple[torch.Tensor, list[torch.Tensor]]:
            slots = torch.arange(7)
            seq = SeqAttnMeta(0, 7, slots, pos, pos, None)
            batch = ForwardBatch(AttentionMeta(slots, (seq,)), pool.k, pool.v, backend, capture_layers=(0, 1, L))
            with torch.inference_mode():
                out = model(ids, pos, batch)
            return out.hidden, out.aux_hidden

        stack_calls = []
        real = model._stack_weights
        monkeypatch.setattr(model, "_stack_weights", lambda: stack_calls.append(1) or real())
        got = forward()
        assert stack_calls
        monkeypatch.setattr(llama4, "fast_path", lambda x, b: None)
        ref = forward()
    assert len(got[1]) == 3
    for a, b in zip([got[0], *got[1]], [ref[0], *ref[1]]):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
    assert torch.equal(got[1][0], model.embed_tokens(ids))  # layer 0's input is the embedding


def _layer_weights(g: torch.Generator, hidden: int, heads: int, kv_heads: int, d: int, inter: int) -> dict[str, torch.Tensor]:
    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    return {"in_norm": 1 + 0.1 * torch.randn(hidden, generator=g), "q": w(heads * d, hidden),
            "k": w(kv_heads * d, hidden), "v": w(kv_heads * d, hidden), "o": w(hidden, heads * d),
            "post_norm": 1 + 0.1 * torch.randn(hidden, generator=g), "gate": w(inter, hidden),
            "up": w(inter, hidden), "down": w(hidden, inter)}


def _halves_args(lw: dict[str, torch.Tensor], quantise: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(in_norm, qkv, qkv scale, o, o scale), (post_norm, gate_up, its scale, down, its scale) as the
    fused kernels take them; int8 per output channel when `quantise`."""
    def linear(weight: torch.Tensor) -> list[torch.Tensor]:
        if not quantise:
            return [weight.contiguous(), torch.empty(0)]
        scale = weight.abs().amax(1).clamp_min(1e-8) / 127
        return [ck.pack_w8(torch.round(weight / scale[:, None]).to(torch.int8)), scale.float()]

    attn = [lw["in_norm"], *linear(torch.cat([lw["q"], lw["k"], lw["v"]])), *linear(lw["o"])]
    mlp = [lw["post_norm"], *linear(torch.cat([lw["gate"], lw["up"]])), *linear(lw["down"])]
    return attn, mlp


@pytest.mark.parametrize("quantise", [False, True])
def test_layer_halves_compose_to_the_fused_layer_and_sum_over_shards(quantise: bool) -> None:
    """--tp runs a fused layer as two halves with the ranks' partial sums all-reduced between
    them: x + attention then + mlp is bitwise decoder_layer; and the halves over a 2-way split
    of the heads and the MLP rows, summed, equal the whole layer (float32 weights)."""
    g = torch.Generator().manual_seed(7)
    hidden, heads, kv_heads, d, inter, T, S, eps = 64, 4, 2, 16, 96, 5, 32, 1e-5
    lw = _layer_weights(g, hidden, heads, kv_heads, d, inter)
    x = torch.randn(T, hidden, generator=g)
    pos = torch.arange(8, 8 + T)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = pos[:, None].float() * inv[None, :]
    rope = torch.stack([ang.cos(), ang.sin()], -1).contiguous()  # [T, d/2, 2]
    out_slots, kv_slots = torch.arange(8, 8 + T), torch.arange(8 + T)
    mask = torch.ones(T, 8 + T, dtype=torch.bool)
    mask[:, 8:] = torch.tril(torch.ones(T, T, dtype=torch.bool))
    prefix_k, prefix_v = torch.randn(S, kv_heads, d, generator=g), torch.randn(S, kv_heads, d, generator=g)

    def caches(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return prefix_k[:, lo:hi].clone().contiguous(), prefix_v[:, lo:hi].clone().contiguous()

    attn_w, mlp_w = _halves_args(lw, quantise)
    act_bits = 16
    kc, vc = caches(0, kv_heads)
    whole = kernels.decoder_layer(x, rope, *attn_w, *mlp_w, eps, heads, kv_heads, d, kc, vc, out_slots, kv_slots,
                                  mask, 0.25, act_bits)
    kc2, vc2 = caches(0, kv_heads)
    h = x + kernels.decoder_layer_attention(x, rope, *attn_w, eps, heads, kv_heads, d, kc2, vc2, out_slots, kv_slots,
                                            mask, 0.25, act_bits)
    assert torch.equal(h + kernels.decoder_layer_mlp(h, *mlp_w, eps, act_bits), whole)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)  # the same K/V stored
    if quantise:
        return
    hq, hkv, hi_ = heads // 2, kv_heads // 2, inter // 2
    parts_attn, parts_mlp = [], []
    for r in range(2):
        q_rows, kv_rows, i_rows = slice(r * hq * d, (r + 1) * hq * d), slice(r * hkv * d, (r + 1) * hkv * d), \
            slice(r * hi_, (r + 1) * hi_)
        shard = {"in_norm": lw["in_norm"], "q": lw["q"][q_rows], "k": lw["k"][kv_rows], "v": lw["v"][kv_rows],
                 "o": lw["o"][:, q_rows], "post_norm": lw["post_norm"], "gate": lw["gate"][i_rows],
                 "up": lw["up"][i_rows], "down": lw["down"][:, i_rows]}
        a_w, m_w = _halves_args(shard, False)
        kr, vr = caches(r * hkv, (r + 1) * hkv)
        parts_attn.append(kernels.decoder_layer_attention(x, rope, *a_w, eps, hq, hkv, d, kr, vr, out_slots,
                                                          kv_slots, mask, 0.25, act_bits))
        parts_mlp.append((m_w, (kr, vr)))
        _close(kr[out_slots], kc[out_slots][:, r * hkv:(r + 1) * hkv])  # this rank's K heads stored
    h = x + parts_attn[0] + parts_attn[1]
    out = h + sum(kernels.decoder_layer_mlp(h, *m_w, eps, act_bits) for m_w, _ in parts_mlp)
    _close(out, whole)


@pytest.mark.parametrize("quantization", [None, "w8a16", "w8a8_int8", "w4a16"])
def test_fused_eagle3_layer_matches_the_module_path(monkeypatch, quantization) -> None:
    """The draft head's one-call layer == its module path: a prefix extend (causal) and a tree
    step (masked), K/V written to the pool at the same slots; hidden within 1e-4."""
    import specdec.draft.eagle3 as eagle3
    from specdec.kernels.backend import AttentionMeta, ForwardBatch, SeqAttnMeta
    from specdec.kernels.torch_backend import TorchAttentionBackend

    from .tiny_models import tiny_eagle3_draft

    draft = tiny_eagle3_draft(7, quantization)
    backend = TorchAttentionBackend()

    def run(fast: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(eagle3, "fast_path", eagle3.fast_path if fast else (lambda x, b: None))
        k_pool, v_pool = torch.zeros(64, 2, 16), torch.zeros(64, 2, 16)
        gen = torch.Generator().manual_seed(3)
        ids, feats = torch.randint(0, 300, (9,), generator=gen), torch.randn(9, 64, generator=gen)
        slots = torch.arange(10, 19)
        pos = torch.arange(6)  # extend 6 positions, causal
        seq = SeqAttnMeta(0, 6, slots[:6], pos, pos, None)
        batch = ForwardBatch(AttentionMeta(slots[:6], (seq,)), [k_pool], [v_pool], backend)
        with torch.inference_mode():
            first = draft(ids[:6], feats[:6], pos, batch).hidden
            mask = torch.tensor([[1] * 6 + [1, 0, 0], [1] * 6 + [0, 1, 0], [1] * 6 + [1, 0, 1]], dtype=torch.bool)
            qpos = torch.tensor([6, 6, 7])
            seq = SeqAttnMeta(0, 3, slots, qpos, torch.arange(9), mask)
            batch = ForwardBatch(AttentionMeta(slots[6:], (seq,)), [k_pool], [v_pool], backend)
            out = draft(ids[6:], feats[6:], qpos, batch)
        return first, out.logits_hidden, k_pool

    ref = run(fast=False)
    calls = []
    real = eagle3.fast_path
    monkeypatch.setattr(eagle3, "fast_path", lambda x, b: calls.append(1) or real(x, b))
    assert draft.fused_weights() is not None
    got = run(fast=True)
    assert calls
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_complex_rope_equals_the_pairwise_reference() -> None:
    from specdec.target.layers import RotaryEmbedding, apply_rope, apply_rope_cis

    rot = RotaryEmbedding([1.0 / (10000.0 ** (i / 8)) for i in range(0, 8, 1)])
    pos = torch.tensor([0, 3, 17, 400])
    x = torch.randn(4, 5, 16)
    cos, sin = rot.cos_sin(pos)
    torch.testing.assert_close(apply_rope_cis(x, rot.cis(pos)), apply_rope(x, cos, sin), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("R", "V", "k"), [(1, 1, 1), (4, 8192, 4), (3, 37, 5), (2, 7, 7), (5, 49152, 8), (1, 9, 3)])
def test_top_logprobs_matches_log_softmax_top_k(R: int, V: int, k: int) -> None:
    g = torch.Generator().manual_seed(R * V + k)
    x = 4 * torch.randn(R, V, generator=g)
    if V > 1:
        x[0, V // 2] = float("-inf")  # a masked token: chosen last, exp = 0
    vals, idx = kernels.top_logprobs(x, k)
    ref_vals, ref_idx = ck.top_logprobs_reference(x, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(vals, ref_vals, atol=1e-5, rtol=0)  # -inf where k reaches the masked token


def test_top_logprobs_breaks_ties_toward_the_smaller_index_and_checks_its_input() -> None:
    x = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0, 1.0, 0.5, 2.0, 0.0, 1.0]])
    vals, idx = kernels.top_logprobs(x, 5)
    assert idx.tolist() == [[1, 3, 4, 8, 2]]
    assert vals[0, :4].tolist() == [vals[0, 0].item()] * 4
    assert vals[0, 0].item() == pytest.approx(torch.log_softmax(x, -1)[0, 1].item(), abs=1e-6)
    with pytest.raises(RuntimeError, match="k must be in"):
        kernels.top_logprobs(x, 12)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernels.top_logprobs(x.double(), 2)


@pytest.mark.parametrize(("R", "V"), [(1, 1), (3, 7), (2, 8), (4, 37), (16, 49152), (2, 8193)])
def test_argmax_rows_equals_torch_argmax(R: int, V: int) -> None:
    """Random rows, a maximum in the 8-wide tail, ties (the smallest index), -inf and NaN rows."""
    g = torch.Generator().manual_seed(R * V)
    x = torch.randn(R, V, generator=g)
    if V > 1:
        x[0, -1] = 100.0  # the tail's maximum (V % 8 of them past the vector part)
    if R > 1:
        x[1] = -float("inf")  # a row where everything is masked: index 0
    if R > 2 and V > 5:
        x[2, [5, 2, V - 1]] = 50.0  # equal maxima: the first one
        x[2, 3] = float("inf")  # above them all
    if R > 3 and V > 20:
        x[3, [20, 9]] = float("nan")  # torch.argmax: the first NaN
    got = kernels.argmax_rows(x)
    assert got.dtype == torch.long and got.tolist() == x.argmax(dim=-1).tolist()
    assert ck.argmax_rows(x).tolist() == x.argmax(dim=-1).tolist()
    assert ck.argmax_rows(x.double()).tolist() == x.argmax(dim=-1).tolist()  # (torch's op off the kernel)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernels.argmax_rows(x.t() if V > 1 and R > 1 else x.double())


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn])
def test_several_requests_trees_attend_through_the_kernel_as_through_sdpa(chunk_size, kv_dtype) -> None:
    """A batch of several requests' trees (masked), prompt chunks (causal, mask None) and a
    one-token step: the torch backend's per-request C++ path equals its SDPA reference per
    request (1e-5), and the kernel is what ran."""
    from specdec.kernels import torch_backend
    from specdec.kernels.backend import AttentionMeta, SeqAttnMeta
    from specdec.kernels.torch_backend import TorchAttentionBackend

    g = torch.Generator().manual_seed(11)
    H, Hkv, D = 4, 2, 16
    k_cache = torch.randn(96, Hkv, D, generator=g).to(kv_dtype)
    v_cache = torch.randn(96, Hkv, D, generator=g).to(kv_dtype)
    seqs, start, base = [], 0, 0
    for c, n, masked in ((9, 4, True), (5, 3, False), (13, 1, False), (7, 5, True)):
        slots = torch.randperm(96 - base, generator=g)[: c + n] + base  # scattered, distinct per request
        q_pos = torch.arange(c, c + n)
        mask = None
        if masked:  # a tree: each node sees the prefix, itself and a random subset of earlier nodes
            tail = torch.tril(torch.rand(n, n, generator=g) < 0.6) | torch.eye(n, dtype=torch.bool)
            mask = torch.cat((torch.ones(n, c, dtype=torch.bool), tail), dim=1)
        seqs.append(SeqAttnMeta(start, n, slots, q_pos, torch.arange(c + n), mask))
        start += n
    q = torch.randn(start, H, D, generator=g)
    k, v = torch.randn(start, Hkv, D, generator=g), torch.randn(start, Hkv, D, generator=g)
    out_slots = torch.cat([s.kv_slots[-s.q_len :] for s in seqs])
    meta = AttentionMeta(out_slots, tuple(seqs))
    backend = TorchAttentionBackend()
    calls = []
    real = torch_backend._fast_kernels
    torch_backend._fast_kernels = lambda *a: calls.append(1) or real(*a)  # type: ignore[assignment]
    try:
        got = backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, 0.25, chunk_size)
    finally:
        torch_backend._fast_kernels = real  # type: ignore[assignment]
    assert calls
    kc, vc = k_cache.clone(), v_cache.clone()
    kc[out_slots], vc[out_slots] = k.to(kv_dtype), v.to(kv_dtype)
    for s in seqs:
        rows = slice(s.q_start, s.q_start + s.q_len)
        want = TorchAttentionBackend._one(q[rows], kc, vc, s, 0.25, chunk_size)
        torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-5)

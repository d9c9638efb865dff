"""fp8 KV cache (`--kv-cache-dtype`): storage in fp8 with per-layer scales (checkpoint,
`--quantization-param-path`, or 1.0), upcast in attention; its logprob cost against float32 KV
on a tiny Llama 4 (hybrid KV on) and on a dense Llama, within the tolerances written here."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from specdec.kernels.backend import AttentionMeta, ForwardBatch, SeqAttnMeta
from specdec.kernels.torch_backend import TorchAttentionBackend
from specdec.kv_dtype import read_scale_file

from .test_hybrid_kv import HYBRID
from .tiny_models import Checkpoint, make_checkpoint, random_prompts

# mean / max |logprob difference| of fp8 KV against float32 KV over every scored position
# (e4m3 keeps 3 mantissa bits, e5m2 2: about 6 % / 12 % relative error per K/V element)
TOL = {"fp8_e4m3": (0.03, 0.25), "fp8_e5m2": (0.06, 0.5)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    root = tmp_path_factory.mktemp("fp8")
    return {"llama4": make_checkpoint(root / "l4", "llama4", seed=3, **HYBRID),
            "llama": make_checkpoint(root / "dense", "llama", seed=4)}


def _scored(engine: Any, seqs: list[list[int]]) -> torch.Tensor:
    """Prompt logprobs of every position after the first, all sequences."""
    outs = engine.generate(input_ids=seqs, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                           logprob_start_len=0)
    return torch.tensor([e[0] for o in outs for e in o["meta_info"]["input_token_logprobs"][1:]])


@pytest.mark.parametrize("kind", ["llama4", "llama"])
@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_logprobs_stay_close_to_float32_kv(ckpts: dict[str, Checkpoint], kind: str, dtype: str) -> None:
    ckpt = ckpts[kind]
    prompts = random_prompts((12, 30), seed=6)
    ref_engine = ckpt.engine(page_size=4)
    gen = ref_engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 40,
                                                                  "ignore_eos": True})
    seqs = [p + o["output_ids"] for p, o in zip(prompts, gen, strict=True)]  # teacher forcing
    ref = _scored(ref_engine, seqs)
    engine = ckpt.engine(page_size=4, kv_cache_dtype=dtype)
    assert engine.kv_pool.k[0].dtype == {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[dtype]
    diff = (_scored(engine, seqs) - ref).abs()
    mean_tol, max_tol = TOL[dtype]
    assert float(diff.mean()) < mean_tol and float(diff.max()) < max_tol, (float(diff.mean()), float(diff.max()))
    assert float(diff.max()) > 0  # it did store fp8
    print(f"{kind} {dtype}: mean |dlogprob| {float(diff.mean()):.4f}, max {float(diff.max()):.4f} "
          f"over {diff.numel()} positions")
    # greedy generation under fp8 runs and returns every page
    out = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 20})
    assert all(len(o["output_ids"]) == 20 for o in out)
    assert engine.allocator.num_used_pages == 0


def test_fp8_holds_a_quarter_of_float32_bytes(ckpts: dict[str, Checkpoint]) -> None:
    ckpt = ckpts["llama4"]
    f32, fp8 = ckpt.engine(page_size=4), ckpt.engine(page_size=4, kv_cache_dtype="fp8")
    assert fp8.kv_layout.full_layer_bytes * 4 == f32.kv_layout.full_layer_bytes
    assert fp8.kv_layout.swa_layer_bytes * 4 == f32.kv_layout.swa_layer_bytes


def test_attention_stores_k_over_its_scale_and_folds_it_back() -> None:
    """The module's rule, on the torch backend: cache = fp8(k / k_scale); attention over the
    upcast cache with softmax scale x k_scale and output x v_scale equals float32 attention on
    the dequantised K/V."""
    g = torch.Generator().manual_seed(0)
    T, H, Hkv, D = 5, 4, 2, 8
    q, k, v = (torch.randn(T, h, D, generator=g) * 20 for h in (H, Hkv, Hkv))
    k_scale, v_scale = 0.25, 0.5
    kc = torch.zeros(16, Hkv, D, dtype=torch.float8_e4m3fn)
    vc = torch.zeros_like(kc)
    slots = torch.arange(3, 3 + T)
    meta = AttentionMeta(slots, (SeqAttnMeta(0, T, slots, torch.arange(T), torch.arange(T)),))
    backend = TorchAttentionBackend()
    out = backend.forward(q, k / k_scale, v / v_scale, kc, vc, meta, 8**-0.5 * k_scale, None) * v_scale
    assert torch.equal(kc[slots], (k / k_scale).to(torch.float8_e4m3fn))
    kd, vd = kc[slots].float() * k_scale, vc[slots].float() * v_scale  # what was stored, dequantised
    ref = torch.empty_like(q)
    for t in range(T):  # causal attention by hand
        for h in range(H):
            w = torch.softmax((kd[: t + 1, h // 2] @ q[t, h]) * 8**-0.5, 0)
            ref[t, h] = w @ vd[: t + 1, h // 2]
    assert torch.allclose(out, ref, atol=1e-4)
    _ = ForwardBatch  # (the model passes the same arguments through ForwardBatch)


def _with_scales(src: Checkpoint, dst: Path, scales: dict[str, float]) -> Path:
    import shutil

    shutil.copytree(src.path, dst)
    (file,) = dst.glob("*.safetensors")
    tensors = load_file(str(file))
    for name, value in scales.items():
        tensors[name] = torch.tensor(value)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return dst


def test_scales_come_from_the_checkpoint_then_the_json_then_one(ckpts: dict[str, Checkpoint], tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    src = ckpts["llama4"]
    scales = {f"model.layers.{i}.self_attn.{kind}_scale": 0.5 + 0.1 * i + (0.01 if kind == "v" else 0)
              for i in range(4) for kind in ("k", "v")}
    path = _with_scales(src, tmp_path / "scaled", scales)
    engine = Checkpoint(path, src.hf).engine(page_size=4, kv_cache_dtype="fp8_e4m3")
    got = [layer.attn.kv_scales[:2] for layer in engine.model.layers]
    assert got == [pytest.approx((0.5 + 0.1 * i, 0.51 + 0.1 * i), rel=1e-6) for i in range(4)]
    # without fp8 the scales are read but not used
    plain = Checkpoint(path, src.hf).engine(page_size=4)
    assert all(layer.attn.kv_scales is None for layer in plain.model.layers)

    scale_json = tmp_path / "kv.json"
    scale_json.write_text(json.dumps({"model_type": "llama4", "kv_cache": {
        "dtype": "float8_e4m3fn", "scaling_factor": {"0": {str(i): 2.0 + i for i in range(4)}}}}))
    engine = src.engine(page_size=4, kv_cache_dtype="fp8", quantization_param_path=str(scale_json))
    assert [layer.attn.kv_scales[:2] for layer in engine.model.layers] == [(2.0 + i, 2.0 + i) for i in range(4)]

    with caplog.at_level(logging.WARNING, logger="specdec"):
        engine = src.engine(page_size=4, kv_cache_dtype="fp8_e5m2")
    assert any("using 1.0" in r.message for r in caplog.records)
    assert all(layer.attn.kv_scales[:2] == (1.0, 1.0) for layer in engine.model.layers)


def test_bad_scale_inputs_are_refused(ckpts: dict[str, Checkpoint], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"0": {"0": 1.0}}}}))
    with pytest.raises(ValueError, match="layer 1 has no positive scale"):
        read_scale_file(bad, 2, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="for float8_e4m3fn"):
        read_scale_file(bad, 1, torch.float8_e5m2)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read JSON"):
        read_scale_file(bad, 1, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="needs --kv-cache-dtype fp8"):
        ckpts["llama4"].engine(quantization_param_path=str(bad))
    src = ckpts["llama4"]
    only_k = _with_scales(src, tmp_path / "only_k", {"model.layers.0.self_attn.k_scale": 0.5})
    with pytest.raises(ValueError, match="not both k_scale and v_scale"):
        Checkpoint(only_k, src.hf).engine(kv_cache_dtype="fp8")
    zero = _with_scales(src, tmp_path / "zero", {"model.layers.0.self_attn.k_scale": 0.0,
                                                 "model.layers.0.self_attn.v_scale": 1.0})
    with pytest.raises(ValueError, match="must be positive"):
        Checkpoint(zero, src.hf).engine(kv_cache_dtype="fp8")

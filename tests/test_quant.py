"""Quantisation (--quantization w8a16 | w8a8_int8 | w4a16): error bounds of the codes, every
kernel path against its dequantised weight, and the engine end to end on a tiny Llama 4 with
MoE (greedy speculative output equals the quantised model's own greedy output)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from specdec.kernels import cpu_kernels
from specdec.target.quant import QuantWeight, quantize_w4, quantize_w8

from .spec_models import make_random_eagle3
from .test_spec_e2e import FULL_LLAMA4
from .tiny_models import VOCAB, Checkpoint, make_checkpoint, random_prompts


def test_w8_codes_are_within_half_a_step() -> None:
    w = torch.randn(16, 64) * torch.rand(16, 1) * 3
    q, scale = quantize_w8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())


def test_w4_codes_are_within_half_a_step() -> None:
    w = torch.randn(8, 96)
    q, scale, zero = quantize_w4(w)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    deq = ((q.float().view(8, 3, 32) - 8) * scale[..., None] + zero[..., None]).view(8, 96)
    assert bool(((deq - w).abs() <= scale.repeat_interleave(32, 1) / 2 + 1e-5).all())
    with pytest.raises(ValueError, match="% 32"):
        quantize_w4(torch.randn(4, 48))


# the active tier's kernels (int16 activations) or, without a tier, the dequantised weight in a
# float32 linear; K = 48 is not a multiple of the kernels' block of 32 (padded with zero columns)
KERNEL = cpu_kernels.active_isa() if cpu_kernels.extension() is not None else "dequant"
TOL = 1e-4 if KERNEL != "dequant" else 1e-5  # relative, against x @ dequantized.T in float64
PATHS = [(scheme, K, KERNEL, TOL) for scheme in ("w8a16", "w8a8_int8", "w4a16") for K in (64, 48, 40)]


@pytest.mark.parametrize(("scheme", "K", "kernel", "tol"), PATHS)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_quantized_matmul_matches_its_dequantized_weight(scheme: str, K: int, kernel: str, tol: float,
                                                         rows: int) -> None:
    g = torch.Generator().manual_seed(K + rows)
    w, x, bias = torch.randn(48, K, generator=g), torch.randn(rows, K, generator=g), torch.randn(48, generator=g)
    qw = QuantWeight(w, scheme)
    assert qw.kernel == kernel
    # w8a8_int8 multiplies the int8 codes of x (per block), on every path
    xin = cpu_kernels.quantized_activations(x, 8) if scheme == "w8a8_int8" else x
    ref = xin.double() @ qw.dequantized().double().T + bias.double()
    y = qw(x, bias)
    assert y.dtype == torch.float32 and y.shape == (rows, 48)
    assert (y.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
    # and the dequantised weight is close to the original (the quantisation error itself)
    rel = ((qw.dequantized() - w).norm() / w.norm()).item()
    assert rel < (0.01 if qw.scheme != "w4a16" else 0.12)
    if scheme == "w8a8_int8":  # the int8 activation codes: within half a step of amax / 127 per block
        step = x.abs().amax(1, keepdim=True) / 127  # one block per row here (K <= 64)
        assert bool(((xin - x).abs() <= step / 2 + 1e-7).all())


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("qtarget"), "llama4", seed=5, hidden_size=64,
                           intermediate_size=64, intermediate_size_mlp=96, **FULL_LLAMA4)


def _prompt_logprobs(engine: Any, prompt: list[int]) -> torch.Tensor:
    out = engine.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 1},
                          return_logprob=True, logprob_start_len=0)
    return torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]])


@pytest.mark.parametrize(("scheme", "max_mean_diff"), [("w8a16", 0.02), ("w8a8_int8", 0.05), ("w4a16", 0.25)])
def test_engine_quantized_is_close_and_speculation_stays_lossless(
    target: Checkpoint, tmp_path: Path, scheme: str, max_mean_diff: float
) -> None:
    prompts = random_prompts((4, 9, 17), seed=3)
    params = {"temperature": 0, "max_new_tokens": 20}
    with target.engine() as full, target.engine(quantization=scheme) as quant:
        # plain first: the speculative engine below starts with an empty prefix cache too, so
        # both prefill the same batches (a cache hit changes a prefill's batch composition)
        plain = [o["output_ids"] for o in quant.generate(input_ids=prompts, sampling_params=params)]
        ref_lp = _prompt_logprobs(full, prompts[2])
        q_lp = _prompt_logprobs(quant, prompts[2])
        experts = [m for m in quant.model.modules() if getattr(m, "quantized", None) is not None]
        assert experts, "the routed experts were not quantised"
    # quantisation error on the prompt's logprobs, per token (random weights: a loose bound)
    assert (q_lp - ref_lp).abs().mean().item() < max_mean_diff
    draft = tmp_path / "draft"
    make_random_eagle3(draft, 64, VOCAB, seed=1)
    with target.engine(quantization=scheme, speculative_algorithm="EAGLE3",
                       speculative_draft_model_path=str(draft), speculative_num_steps=3,
                       speculative_eagle_topk=2, speculative_num_draft_tokens=4) as spec:
        outs = spec.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in outs] == plain


def test_bad_quantization_is_refused() -> None:
    import specdec

    with pytest.raises(ValueError, match="quantization must be one of"):
        specdec.Engine(quantization="fp3")

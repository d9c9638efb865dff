"""Device placement (`--device`): resolution, refusal without a GPU, and metadata that moves
every tensor to the model's device (checked against the meta device, since no GPU runs here)."""

from __future__ import annotations

import pytest
import torch

from specdec.engine import resolve_device
from specdec.kernels.backend import AttentionMeta, PaddedKV, SeqAttnMeta


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
    padded = PaddedKV(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool),
                      torch.arange(5)[None], torch.tensor([4]))
    meta = AttentionMeta(torch.tensor([3, 4]), (seq,), padded)
    assert meta.to(torch.device("cpu")) is meta
    moved = meta.to(torch.device("meta"))
    tensors = [moved.out_slots, *[getattr(moved.seqs[0], f) for f in ("kv_slots", "q_positions",
                                                                       "kv_positions", "mask")]]
    assert moved.padded is not None
    tensors += [moved.padded.index, moved.padded.valid, moved.padded.kv_positions, moved.padded.q_positions]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.seqs[0].q_len == 2 and moved.seqs[0].q_start == 0

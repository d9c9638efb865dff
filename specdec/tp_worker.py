"""A worker rank of `--tp N` (ranks 1..N-1): its shard of the target and its K/V pools, driven
by rank 0's model runner (specdec/distributed.py).

Start-up, in step with rank 0's `Engine`: join the group, load this rank's shard, receive the
pools' sizes rank 0 planned (every rank has the same slots, its own KV heads), report what this
rank holds (weights and KV bytes: `Engine.tp_footprints`), then run each command rank 0
broadcasts (`forward`, `logits`, `copy`) on this rank's shard until `stop`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from specdec.kernels import get_attention_backend
from specdec.kernels.kv_pool import KVPool
from specdec.target.embedded import resolve_model_path
from specdec.target.loader import load_model
from specdec.target.quant import quantize_model

from .distributed import TPGroup, init_group
from .engine_config import EngineConfig
from .generation_config import load_generation_defaults
from .kv_dtype import apply_kv_scales, kv_storage_dtype
from .model_runner import ModelRunner

log = logging.getLogger(__name__)


def rank_device(device: torch.device, rank: int, ranks_per_node: int) -> torch.device:
    """A GPU rank's own device (cuda:<local rank>); the CPU is shared."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", rank % ranks_per_node)


def footprint(model: torch.nn.Module, pools: list[KVPool | None]) -> dict[str, int]:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    kv = sum(t.numel() * t.element_size() for pool in pools if pool is not None for t in (*pool.k, *pool.v))
    return {"weight_bytes": weights, "kv_bytes": kv}


class TPWorker:
    def __init__(self, rank: int, world: int, addr: str, engine_kwargs: dict[str, Any]) -> None:
        from .engine import resolve_device

        cfg = EngineConfig.from_kwargs(**engine_kwargs)
        self.device = rank_device(resolve_device(cfg.device), rank, cfg.dist_config().ranks_per_node)
        self.group: TPGroup = init_group(rank, world, addr, self.device)
        path = resolve_model_path(cfg.model_path)
        defaults = load_generation_defaults(cfg.generation_config, cfg.override_generation_config, path)
        self.model, mc = load_model(path, cfg.dtype, defaults.attn_temperature_tuning, tp=self.group,
                                    ep_size=cfg.dist_config().ep_size)
        self.model.to(self.device)
        quantize_model(self.model, cfg.quantization)
        dtype = next(self.model.parameters()).dtype
        kv_dtype = kv_storage_dtype(cfg.kv_cache_dtype, dtype)
        apply_kv_scales(self.model, kv_dtype, cfg.quantization_param_path)
        plan = self.group.broadcast()  # rank 0's pools: (full layers, full slots, window layers, window slots)
        full_layers, full_tokens, swa_layers, swa_tokens = plan
        kv_heads, head_dim = self.model.kv_heads, mc.head_dim
        pool = KVPool(full_layers, full_tokens, kv_heads, head_dim, kv_dtype, self.device)
        swa_pool = KVPool(swa_layers, swa_tokens, kv_heads, head_dim, kv_dtype, self.device) if swa_layers else None
        backend = get_attention_backend(cfg.attention_backend, self.device)
        self.runner = ModelRunner(self.model, pool, backend, swa_pool)
        self.group.gather(footprint(self.model, [pool, swa_pool]))
        log.info("rank %d of %d: shard loaded, %d KV slots", rank, world, full_tokens)

    @torch.inference_mode()
    def run(self) -> None:
        while True:
            cmd = self.group.broadcast()
            op = cmd[0]
            if op == "forward":
                self.runner.forward_local(*cmd[1:])
            elif op == "logits":
                self.model.compute_logits(cmd[1].to(self.device))
            elif op == "copy":
                self.runner.copy_local(cmd[1], cmd[2])
            elif op == "stop":
                return
            else:
                raise RuntimeError(f"unknown tensor-parallel command {op!r}")

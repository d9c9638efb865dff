"""A worker rank of `--tp N` (ranks 1..N-1): its shard of the target and its K/V pools, driven
by rank 0's model runner (specdec/distributed.py).

Start-up, in step with rank 0's `Engine`: join the group, load this rank's shard, receive the
pools' sizes rank 0 planned (every rank has the same slots, its own KV heads), report what this
rank holds (weights and KV bytes: `Engine.tp_footprints`), then run each command rank 0
broadcasts (`forward`, `logits`, `copy`; with a split EAGLE3 head `draft_features`,
`draft_forward`, `draft_logits`) on this rank's shard until `stop`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from specdec.draft.eagle3 import Eagle3Draft
from specdec.draft.eagle3_config import Eagle3Config
from specdec.draft.eagle3_proposer import draft_forward
from specdec.draft.eagle3_tp import load_eagle3_for_rank, split_problem
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


def _weight_bytes(model: torch.nn.Module | None) -> int:
    if model is None:
        return 0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + sum(b.numel() * b.element_size() for b in model.buffers())


def _kv_bytes(pools: list[KVPool | None]) -> int:
    return sum(t.numel() * t.element_size() for pool in pools if pool is not None for t in (*pool.k, *pool.v))


def footprint(model: torch.nn.Module, pools: list[KVPool | None], draft: torch.nn.Module | None = None,
              draft_pool: KVPool | None = None) -> dict[str, int]:
    """What one rank holds: the target's weights and K/V pools, the EAGLE3 head's weights and pool."""
    return {"weight_bytes": _weight_bytes(model), "kv_bytes": _kv_bytes(pools),
            "draft_weight_bytes": _weight_bytes(draft), "draft_kv_bytes": _kv_bytes([draft_pool])}


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
        self.draft = self._load_draft(cfg, path)
        plan = self.group.broadcast()  # rank 0's pools: (full layers, full slots, window layers, window slots)
        full_layers, full_tokens, swa_layers, swa_tokens = plan
        kv_heads, head_dim = self.model.kv_heads, mc.head_dim
        pool = KVPool(full_layers, full_tokens, kv_heads, head_dim, kv_dtype, self.device)
        swa_pool = KVPool(swa_layers, swa_tokens, kv_heads, head_dim, kv_dtype, self.device) if swa_layers else None
        backend = get_attention_backend(cfg.attention_backend, self.device)
        self.runner = ModelRunner(self.model, pool, backend, swa_pool)
        # the split EAGLE3 head's K/V: its KV heads over the same slots (in the model dtype, as rank 0's)
        self.draft_pool = None if self.draft is None else KVPool(1, full_tokens, self.draft.num_kv_heads,
                                                                 self.draft.cfg.head_dim, dtype, self.device)
        self.group.gather(footprint(self.model, [pool, swa_pool], self.draft, self.draft_pool))
        log.info("rank %d of %d: shard loaded, %d KV slots", rank, world, full_tokens)

    def _load_draft(self, cfg: EngineConfig, model_path: Path) -> Eagle3Draft | None:
        """This rank's slices of the EAGLE3 head, or None (no head, or one that runs whole on rank 0)."""
        spec = cfg.spec_config()
        if spec is None or spec.algorithm == "NGRAM" or spec.draft_model_path is None:
            return None
        if split_problem(Eagle3Config.from_path(Path(spec.draft_model_path)), self.group.world) is not None:
            return None  # (rank 0 runs it whole: nothing to load here)
        draft, _ = load_eagle3_for_rank(spec.draft_model_path, model_path, self.model, cfg.dtype, self.group)
        draft.to(self.device)
        quantize_model(draft, cfg.quantization)
        return draft

    def _draft(self) -> tuple[Eagle3Draft, KVPool]:
        if self.draft is None or self.draft_pool is None:
            raise RuntimeError("a draft command reached a rank without a split EAGLE3 head")
        return self.draft, self.draft_pool

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
            elif op == "draft_features":
                self._draft()[0].project_features([a.to(self.device) for a in cmd[1]])
            elif op == "draft_forward":
                draft_forward(*self._draft(), self.runner.backend, *cmd[1:])
            elif op == "draft_logits":
                self._draft()[0].draft_logits(cmd[1].to(self.device))
            elif op == "stop":
                return
            else:
                raise RuntimeError(f"unknown tensor-parallel command {op!r}")

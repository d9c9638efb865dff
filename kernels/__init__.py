"""Attention backends behind one interface (torch reference on CPU)."""

from __future__ import annotations

from .backend import AttentionBackend, AttentionMeta, SeqAttnMeta
from .torch_backend import TorchAttentionBackend

BACKENDS = ("torch",)


def get_attention_backend(name: str) -> AttentionBackend:
    """Resolve `--attention-backend`; unknown or unavailable names fail with a clear message."""
    if name in ("torch", "auto"):
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available here: {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionMeta",
    "SeqAttnMeta",
    "TorchAttentionBackend",
    "get_attention_backend",
]

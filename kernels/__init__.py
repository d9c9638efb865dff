"""Attention backends behind one interface: torch (reference, any device), triton, flashinfer.

`get_attention_backend(name, device)` resolves `--attention-backend`:

* `auto`: CPU -> torch; CUDA -> flashinfer when importable, else triton when importable,
  else torch;
* `torch`: always available;
* `triton`: needs a CUDA GPU, or Triton's CPU interpreter (`TRITON_INTERPRET=1`, for tests);
* `flashinfer`: needs a CUDA GPU and flashinfer-python.

An unavailable backend raises `BackendUnavailable` at start-up with what to do instead. The
Triton and FlashInfer modules are imported only here, on demand: `@triton.jit` decides between
compiled and interpreted kernels when its module is imported.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from .backend import AttentionBackend, AttentionMeta, SeqAttnMeta
from .errors import BackendUnavailable
from .torch_backend import TorchAttentionBackend
from .triton_interpreter import interpreter_enabled as triton_interpreter_enabled

BACKENDS = ("torch", "triton", "flashinfer")

log = logging.getLogger("specdec")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _triton_backend(device: torch.device) -> AttentionBackend:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable("Triton needs a CUDA GPU and none is visible; "
                                     "use --attention-backend torch")
    elif device.type == "cpu":
        if not triton_interpreter_enabled():
            raise BackendUnavailable(
                "Triton kernels need a CUDA GPU; on the CPU they run only in Triton's "
                "interpreter (TRITON_INTERPRET=1, for tests). Use --attention-backend torch"
            )
    else:
        raise BackendUnavailable(f"Triton kernels do not run on {device.type!r}; "
                                 "use --attention-backend torch")
    if not _importable("triton"):
        raise BackendUnavailable("Triton is not installed (pip install 'specdec[gpu]'); "
                                 "use --attention-backend torch")
    from .triton_attention import TritonAttentionBackend

    backend = TritonAttentionBackend()
    if device.type == "cpu" and not backend.interpreted():
        raise BackendUnavailable(
            "specdec.kernels.triton_attention was imported before TRITON_INTERPRET=1 was set, "
            "so its kernels are compiled for a GPU; set TRITON_INTERPRET=1 before start-up"
        )
    if device.type == "cuda" and backend.interpreted():
        log.warning("TRITON_INTERPRET is set: Triton kernels run in the (slow) interpreter")
    return backend


def _flashinfer_backend(device: torch.device) -> AttentionBackend:
    from .flashinfer_backend import FlashInferAttentionBackend

    return FlashInferAttentionBackend(device)


def resolve_backend_name(name: str, device: torch.device) -> str:
    """The concrete backend `auto` stands for on `device` (other names unchanged)."""
    if name != "auto":
        return name
    if device.type != "cuda" or not torch.cuda.is_available():
        return "torch"
    if _importable("flashinfer"):
        return "flashinfer"
    if _importable("triton"):
        return "triton"
    return "torch"


def get_attention_backend(name: str, device: torch.device | str | None = None) -> AttentionBackend:
    """Resolve `--attention-backend` for the model's device (default: the CPU); unknown or
    unavailable names fail with a clear message."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if name not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    resolved = resolve_backend_name(name, dev)
    if resolved == "torch":
        return TorchAttentionBackend()
    if resolved == "triton":
        return _triton_backend(dev)
    if name == "auto":
        try:
            return _flashinfer_backend(dev)
        except BackendUnavailable as e:  # importable but broken: fall back like SGLang would
            log.warning("%s; falling back to triton", e)
            return _triton_backend(dev)
    return _flashinfer_backend(dev)


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionMeta",
    "BackendUnavailable",
    "SeqAttnMeta",
    "TorchAttentionBackend",
    "get_attention_backend",
    "resolve_backend_name",
    "triton_interpreter_enabled",
]

"""fp8 KV cache (`--kv-cache-dtype fp8|fp8_e4m3|fp8_e5m2`): the storage dtype and the per-layer
scales K and V are divided by before they are stored.

Scales come, per layer, from the checkpoint's `k_scale` / `v_scale` tensors (vLLM's and
ModelOpt's names, loaded by target/loader.py), else from `--quantization-param-path` (the JSON
SGLang and vLLM read: `{"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"0":
{"<layer>": scale}}}}`, one scale for K and V of a layer, rank "0" without tensor parallelism),
else 1.0 with a warning (fine for activations within the format's range: e4m3 holds up to 448).
The attention module folds the scales into its softmax scale and output (target/llama4.py), so
the backends only upcast what they read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from specdec.target.llama4 import Attention

log = logging.getLogger("specdec")

FP8_DTYPES: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
_JSON_DTYPES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


def kv_storage_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """`auto` stores K/V in the model dtype."""
    if name == "auto":
        return model_dtype
    if name not in FP8_DTYPES:
        raise ValueError(f"--kv-cache-dtype {name!r}: choose auto, fp8, fp8_e4m3 or fp8_e5m2")
    return FP8_DTYPES[name]


def read_scale_file(path: str | Path, num_layers: int, dtype: torch.dtype) -> dict[int, float]:
    """Per-layer scales from a `--quantization-param-path` JSON; every layer must be there."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--quantization-param-path {path}: cannot read JSON ({e})") from e
    kv = raw.get("kv_cache") if isinstance(raw, dict) else None
    if not isinstance(kv, dict) or not isinstance(kv.get("scaling_factor"), dict):
        raise ValueError(f"--quantization-param-path {path}: no kv_cache.scaling_factor object")
    want = _JSON_DTYPES[dtype]
    if kv.get("dtype", want) != want:
        raise ValueError(f"--quantization-param-path {path}: its scales are for {kv.get('dtype')}, "
                         f"the KV cache stores {want}")
    rank = kv["scaling_factor"].get("0")
    if not isinstance(rank, dict):
        raise ValueError(f"--quantization-param-path {path}: no scales for rank 0")
    scales: dict[int, float] = {}
    for layer in range(num_layers):
        value = rank.get(str(layer))
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"--quantization-param-path {path}: layer {layer} has no positive scale ({value!r})")
        scales[layer] = float(value)
    return scales


def apply_kv_scales(model: nn.Module, dtype: torch.dtype, param_path: str | None) -> str:
    """Give every attention module of `model` its fp8 scales (or none for a non-fp8 `dtype`);
    returns where the scales came from, for the start-up log."""
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    if dtype not in _JSON_DTYPES:
        for a in attns:
            a.kv_scales = None
        return "none"
    top = float(torch.finfo(dtype).max)
    from_file = None if param_path is None else read_scale_file(param_path, len(attns), dtype)
    sources: set[str] = set()
    for i, a in enumerate(attns):
        ckpt = a.checkpoint_kv_scales
        if ckpt:
            if set(ckpt) != {"k", "v"}:
                raise ValueError(f"layer {i} of the checkpoint has {sorted(ckpt)} but not both k_scale and v_scale")
            k_scale, v_scale = ckpt["k"], ckpt["v"]
            sources.add("checkpoint")
        elif from_file is not None:
            k_scale = v_scale = from_file[i]
            sources.add(str(param_path))
        else:
            k_scale = v_scale = 1.0
            sources.add("1.0")
        if not (k_scale > 0 and v_scale > 0):
            raise ValueError(f"layer {i}: KV scales must be positive; got k {k_scale}, v {v_scale}")
        a.kv_scales = (k_scale, v_scale, top)
    if "1.0" in sources:
        log.warning("fp8 KV cache without scales for %s: using 1.0 (pass --quantization-param-path, or a "
                    "checkpoint with k_scale / v_scale)", "every layer" if sources == {"1.0"} else "some layers")
    return " + ".join(sorted(sources))

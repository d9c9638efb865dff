"""Strict, streamed checkpoint loading for the Llama 4 text model.

The model is built on the meta device, materialised uninitialised, then every parameter
(shard) is filled from safetensors exactly once. A checkpoint tensor with no home, a
parameter never filled, a mis-shaped tensor or an unreadable file raises `LoadError`
naming the tensor and the file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .config import CheckpointLayout, ModelConfig
from .llama4 import Llama4ForCausalLM
from .tp import TensorSlice, plan_shard, tensor_slice

if TYPE_CHECKING:
    from specdec.distributed import TPGroup

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
}


class LoadError(RuntimeError):
    """A checkpoint that does not match the model exactly."""


def resolve_dtype(dtype: str, cfg: ModelConfig) -> torch.dtype:
    """`auto` takes the checkpoint's dtype (float32 when it names none)."""
    if dtype == "auto":
        return DTYPES.get(cfg.torch_dtype or "float32", torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, bfloat16, float16 or float32")
    return DTYPES[dtype]


# ---- the name table -------------------------------------------------------------------------

Transform = Callable[[Tensor], Tensor]


@dataclass(frozen=True, slots=True)
class Target:
    """Where one checkpoint tensor goes: a parameter, optionally one shard of it."""

    param: str
    shard: int | None = None
    is_bias: bool = False
    transform: Transform | None = None
    kv_scale: str | None = None  # "k" / "v": an fp8 KV scale of the attention module `param`
    # the checkpoint dim of each dim after `transform` (None: the same), so a --tp rank can read
    # only its slice (`iter_lazy`); every transform maps whole heads / rows to whole ones
    dim_map: tuple[int, ...] | None = None


def _identity(t: Tensor) -> Tensor:
    return t


def _transpose_last(t: Tensor) -> Tensor:
    return t.transpose(-1, -2)


def pairs_per_head(head_dim: int) -> Transform:
    """Rows of each head [x_0..x_{D/2-1}, y_0..] -> [x_0, y_0, x_1, y_1, ...], for any number of
    whole heads of `head_dim` rows (all of them, or a --tp rank's)."""

    def permute(t: Tensor) -> Tensor:
        return t.reshape(-1, 2, head_dim // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    return permute


SKIP = Target(param="")  # tensors deliberately not loaded (vision tower while text-only)
_SKIP_PREFIXES = ("vision_model.", "multi_modal_projector.")


def build_name_table(cfg: ModelConfig) -> Callable[[str], Target | None]:
    """Returns a function mapping a checkpoint tensor name to its Target (None: unexpected)."""
    perm_q = pairs_per_head(cfg.head_dim) if cfg.permute_qk else None
    perm_k = perm_q
    mlp = "mlp" if cfg.layout is CheckpointLayout.LLAMA else "feed_forward"
    layer_rules: list[tuple[re.Pattern[str], Callable[[int, bool], Target]]] = []

    def rule(pattern: str, make: Callable[[int, bool], Target]) -> None:
        layer_rules.append((re.compile(pattern), make))

    def qkv(shard: int, perm: Transform | None) -> Callable[[int, bool], Target]:
        def make(n: int, b: bool) -> Target:
            return Target(f"layers.{n}.attn.qkv.{'bias' if b else 'weight'}", shard, b, perm)

        return make

    def shared_expert(shard: int) -> Callable[[int, bool], Target]:
        def make(n: int, b: bool) -> Target:
            return Target(f"layers.{n}.feed_forward.shared_expert.gate_up.weight", shard)

        return make

    for i, (proj, perm) in enumerate((("q", perm_q), ("k", perm_k), ("v", None))):
        rule(rf"self_attn\.{proj}_proj\.(weight|bias)", qkv(i, perm))
    def kv_scale(kind: str) -> Callable[[int, bool], Target]:
        def make(n: int, b: bool) -> Target:
            return Target(f"layers.{n}.attn", kv_scale=kind)

        return make

    for kind in ("k", "v"):  # fp8 KV scales (vLLM / SGLang / ModelOpt names); used with --kv-cache-dtype fp8
        rule(rf"self_attn\.(?:{kind}_proj\.|attn\.)?{kind}_scale", kv_scale(kind))
    rule(r"self_attn\.o_proj\.(weight|bias)",
         lambda n, b: Target(f"layers.{n}.attn.o_proj.{'bias' if b else 'weight'}", 0, b))
    rule(r"input_layernorm\.weight", lambda n, b: Target(f"layers.{n}.input_layernorm.weight"))
    rule(r"post_attention_layernorm\.weight",
         lambda n, b: Target(f"layers.{n}.post_attention_layernorm.weight"))
    # dense MLP (dense Llama: mlp.*; Llama 4 dense layers: feed_forward.*)
    rule(rf"{mlp}\.gate_proj\.weight", lambda n, b: Target(f"layers.{n}.feed_forward.gate_up.weight", 0))
    rule(rf"{mlp}\.up_proj\.weight", lambda n, b: Target(f"layers.{n}.feed_forward.gate_up.weight", 1))
    rule(rf"{mlp}\.down_proj\.weight", lambda n, b: Target(f"layers.{n}.feed_forward.down.weight", 0))
    # MoE
    rule(r"feed_forward\.router\.weight", lambda n, b: Target(f"layers.{n}.feed_forward.router.weight", 0))
    rule(r"feed_forward\.experts\.gate_up_proj",  # [E, H, 2I] gate first -> [E, 2I, H]
         lambda n, b: Target(f"layers.{n}.feed_forward.experts.w13", None, False, _transpose_last,
                             dim_map=(0, 2, 1)))
    rule(r"feed_forward\.experts\.down_proj",  # [E, I, H] -> [E, H, I]
         lambda n, b: Target(f"layers.{n}.feed_forward.experts.w2", None, False, _transpose_last,
                             dim_map=(0, 2, 1)))
    for i, proj in enumerate(("gate", "up")):
        rule(rf"feed_forward\.shared_expert\.{proj}_proj\.weight", shared_expert(i))
    rule(r"feed_forward\.shared_expert\.down_proj\.weight",
         lambda n, b: Target(f"layers.{n}.feed_forward.shared_expert.down.weight", 0))

    prefix = "language_model." if cfg.layout is CheckpointLayout.LLAMA4_CONDITIONAL else ""
    layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)")

    def lookup(name: str) -> Target | None:
        if prefix:
            if name.startswith(_SKIP_PREFIXES):
                return SKIP
            if not name.startswith(prefix):
                return None
            name = name[len(prefix):]
        if name == "model.embed_tokens.weight":
            return Target("embed_tokens.weight")
        if name == "model.norm.weight":
            return Target("norm.weight")
        if name == "lm_head.weight":
            # tied checkpoints sometimes still carry lm_head; transformers ignores it too
            return SKIP if cfg.tie_word_embeddings else Target("lm_head.weight", 0)
        m = layer_re.fullmatch(name)
        if m is None:
            return None
        n, rest = int(m.group(1)), m.group(2)
        if n >= cfg.num_layers:
            return None
        for pattern, make in layer_rules:
            mm = pattern.fullmatch(rest)
            if mm is None:
                continue
            # a dense tensor on a MoE layer (or the reverse) maps to a unit the model lacks
            # and is reported as unexpected by the caller
            return make(n, bool(mm.groups()) and mm.groups()[0] == "bias")
        return None

    return lookup


# ---- streaming ----------------------------------------------------------------------------


def checkpoint_files(model_path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: an index's shards, or model*.safetensors."""
    index = model_path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LoadError(f"{index}: unreadable index ({e})") from e
        files = sorted({model_path / f for f in weight_map.values()})
        missing = [f for f in files if not f.exists()]
        if missing:
            raise LoadError(f"{index} names missing shard file(s): {', '.join(map(str, missing))}")
        return files
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise LoadError(f"no *.safetensors files in {model_path}")
    return files


Reader = Callable[[TensorSlice | None, tuple[int, ...] | None], Tensor]


def iter_lazy(files: list[Path]) -> Iterator[tuple[Path, str, Reader]]:
    """Every tensor name of `files` with a reader of it: the whole tensor, or a slice (the
    ranges of a dim after the tensor's load transform, `dim_map` giving its dim in the file),
    read alone from the file. A reader is valid until the next name."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for key in fh.keys():

                    def read(sl: TensorSlice | None, dim_map: tuple[int, ...] | None, key: str = key,
                             f: Path = f) -> Tensor:
                        try:
                            if sl is None or sl.zero:
                                return fh.get_tensor(key)
                            handle = fh.get_slice(key)
                            dim = sl.dim if dim_map is None else dim_map[sl.dim]
                            ndim = len(handle.get_shape())
                            lead = () if sl.experts is None else (slice(*sl.experts),)  # (dim 0 in both layouts)
                            parts = [handle[lead + (slice(None),) * (dim - len(lead)) + (slice(lo, hi),)
                                            + (slice(None),) * (ndim - dim - 1)] for lo, hi in sl.ranges]
                            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
                        except (SafetensorError, RuntimeError, ValueError) as e:
                            raise LoadError(f"{f}: cannot read tensor {key!r} ({e})") from e

                    yield f, key, read
        except SafetensorError as e:
            raise LoadError(f"{f}: corrupt or truncated safetensors file ({e})") from e


def _expected_units(model: nn.Module) -> dict[Unit, tuple[int, ...]]:
    """Every (param, shard, is_bias) unit that must be filled, with its shape."""
    from .layers import Linear

    units: dict[Unit, tuple[int, ...]] = {}
    linear_params: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, Linear):
            for s in range(len(mod.out_sizes)):
                units[(f"{mod_name}.weight", s, False)] = mod.shard_shape(s)
                linear_params.add(f"{mod_name}.weight")
                if mod.bias is not None:
                    units[(f"{mod_name}.bias", s, True)] = (mod.out_sizes[s],)
                    linear_params.add(f"{mod_name}.bias")
    for name, p in model.named_parameters():
        if name not in linear_params:
            units[(name, None, False)] = tuple(p.shape)
    return units


def load_model(model_path: str | Path, dtype: str = "auto", attn_temperature_tuning: bool | None = None,
               multimodal: bool = False, tp: TPGroup | None = None,
               ep_size: int = 1) -> tuple[Llama4ForCausalLM, ModelConfig]:
    """Build on meta, materialise, stream every tensor in; strict in both directions. With `tp`
    (--tp N; `ep_size`: --ep-size) build this rank's shard and keep each tensor's slice
    (target/tp.py); `multimodal`
    only changes the log line (target/vision.py loads the vision tensors).

    `attn_temperature_tuning` (from `--override-generation-config`, vLLM's Llama 4 guide)
    replaces the checkpoint's flag of that name before the model is built (None: keep it)."""
    path = Path(model_path)
    cfg = ModelConfig.from_path(path)
    if attn_temperature_tuning is not None:
        cfg = replace(cfg, attn_temperature_tuning=attn_temperature_tuning)
        if all(cfg.rope_layers):
            log.warning("attn_temperature_tuning has no effect on %s: it has no NoPE layers", cfg.architecture)
    torch_dtype = resolve_dtype(dtype, cfg)
    shard = None if tp is None else plan_shard(cfg, tp.rank, tp.world, ep_size)
    with torch.device("meta"):
        model = Llama4ForCausalLM(cfg, shard, tp)
    model = model.to(dtype=torch_dtype).to_empty(device="cpu")
    model.requires_grad_(False)
    files = checkpoint_files(path)
    lookup = build_name_table(cfg)
    tp_slice = None if shard is None else partial(tensor_slice, shard, cfg)
    missing = fill_weights(model, lookup, files, cfg.architecture, multimodal, tp_slice)
    if missing:
        names = checkpoint_names(cfg, lookup)
        keys = [names.get(u, describe_units([u])) for u in missing]
        more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
        raise LoadError(
            f"checkpoint {path} is missing tensor(s) {', '.join(keys[:8])}{more} "
            f"(for {describe_units(missing)})"
        )
    model.eval()
    return model, cfg


Unit = tuple[str, int | None, bool]  # (parameter, shard, is_bias)

_LAYER_KEYS = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
    "self_attn.v_proj.bias", "self_attn.o_proj.bias", "input_layernorm.weight",
    "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "feed_forward.gate_proj.weight", "feed_forward.up_proj.weight",
    "feed_forward.down_proj.weight", "feed_forward.router.weight",
    "feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj",
    "feed_forward.shared_expert.gate_proj.weight", "feed_forward.shared_expert.up_proj.weight",
    "feed_forward.shared_expert.down_proj.weight",
)


def checkpoint_names(cfg: ModelConfig, lookup: Callable[[str], Target | None]) -> dict[Unit, str]:
    """The checkpoint key each parameter unit is loaded from (for error messages)."""
    prefix = "language_model." if cfg.layout is CheckpointLayout.LLAMA4_CONDITIONAL else ""
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    keys += [f"model.layers.{n}.{k}" for n in range(cfg.num_layers) for k in _LAYER_KEYS]
    out: dict[Unit, str] = {}
    for key in keys:
        target = lookup(prefix + key)
        if target is not None and target is not SKIP:
            out.setdefault((target.param, target.shard, target.is_bias), prefix + key)
    return out


def describe_units(units: list[Unit]) -> str:
    names = ", ".join(p if s is None else f"{p}[shard {s}]" for p, s, _ in units[:8])
    return names + (f" (+{len(units) - 8} more)" if len(units) > 8 else "")


def fill_weights(
    model: nn.Module,
    lookup: Callable[[str], Target | None],
    files: list[Path],
    owner: str,
    multimodal: bool = False,
    tp_slice: Callable[[str, int | None, bool], TensorSlice | None] | None = None,
) -> list[Unit]:
    """Stream every checkpoint tensor into its parameter (shard); returns the units never
    filled (the caller decides whether they may come from elsewhere). Raises LoadError on
    an unexpected, duplicate or mis-shaped tensor, naming it and its file. `tp_slice` (--tp):
    the part of each tensor this rank keeps; only that part is read from the file."""
    from .layers import Linear

    expected = _expected_units(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    filled: set[Unit] = set()
    skipped = 0
    for f, key, read in iter_lazy(files):
        target = lookup(key)
        if target is None:
            raise LoadError(f"unexpected tensor {key!r} in {f} (no parameter of {owner} takes it)")
        if target is SKIP:
            skipped += key.startswith(_SKIP_PREFIXES)  # (a tied lm_head is skipped silently)
            continue
        sl = None if tp_slice is None or target.kv_scale is not None else tp_slice(
            target.param, target.shard, target.is_bias)
        tensor = read(sl, target.dim_map)
        if target.kv_scale is not None:
            attn = modules.get(target.param)
            if attn is None or tensor.numel() != 1:
                raise LoadError(f"tensor {key!r} in {f} is not one KV scale of a known layer")
            scales = attn.checkpoint_kv_scales
            assert isinstance(scales, dict)
            if target.kv_scale in scales:
                raise LoadError(f"tensor {key!r} in {f} sets {target.param}'s {target.kv_scale}_scale a second time")
            scales[target.kv_scale] = float(tensor.float().item())
            continue
        unit = (target.param, target.shard, target.is_bias)
        if unit not in expected:
            raise LoadError(f"unexpected tensor {key!r} in {f} (maps to unknown {unit})")
        if unit in filled:
            raise LoadError(f"tensor {key!r} in {f} fills {target.param} a second time")
        value = (target.transform or _identity)(tensor)
        if sl is not None and sl.zero:  # --tp: a row-parallel bias, added by rank 0 alone
            value = torch.zeros_like(value)
        want = expected[unit]
        if tuple(value.shape) != want:
            raise LoadError(
                f"tensor {key!r} in {f} has shape {tuple(tensor.shape)}; expected "
                f"{want if target.transform is None else '(after transform) ' + str(want)}"
            )
        if target.shard is not None:
            mod = modules[target.param.rsplit(".", 1)[0]]
            assert isinstance(mod, Linear)
            mod.load_shard(target.shard, value, target.is_bias)
        else:
            params[target.param].data.copy_(value)
        filled.add(unit)
    if skipped:
        log.info("skipped %d vision/projector tensors (%s)", skipped,
                 "the vision tower loads them" if multimodal else "multimodal is off")
    return sorted(set(expected) - filled, key=str)


class FullEmbeddings(nn.Module):
    """The target's whole embedding and lm_head, for an EAGLE3 draft that runs on rank 0 of
    --tp N (the target's own are vocabulary slices there); what `load_eagle3` reads of a target."""

    def __init__(self, cfg: ModelConfig, embed: Tensor, lm_head: Tensor | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.lm_head: nn.Module | None = None
        if lm_head is not None:
            from .layers import Linear

            self.lm_head = Linear(cfg.hidden_size, (cfg.vocab_size,))
            self.lm_head.weight.data = lm_head


def load_full_embeddings(model_path: str | Path, model: Llama4ForCausalLM) -> FullEmbeddings:
    cfg = model.cfg
    prefix = "language_model." if cfg.layout is CheckpointLayout.LLAMA4_CONDITIONAL else ""
    want = {prefix + "model.embed_tokens.weight": "embed"}
    if not cfg.tie_word_embeddings:
        want[prefix + "lm_head.weight"] = "lm_head"
    dtype = next(model.parameters()).dtype
    found: dict[str, Tensor] = {}
    for _, key, read in iter_lazy(checkpoint_files(Path(model_path))):
        if key in want:
            found[want[key]] = read(None, None).to(dtype)
    missing = [k for k, v in want.items() if v not in found]
    if missing:
        raise LoadError(f"checkpoint {model_path} is missing {', '.join(missing)}")
    return FullEmbeddings(cfg, found["embed"], found.get("lm_head"))

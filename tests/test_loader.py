"""Strict checkpoint loading: every mismatch is a `LoadError` naming the tensor and the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import specdec
from specdec.target.loader import LoadError, load_model

from .tiny_models import Checkpoint, build_model, make_checkpoint, save_checkpoint

# 2 layers: layer 0 dense MLP, layer 1 MoE (so both kinds of tensors are present)
BASE = {"num_hidden_layers": 2, "moe_layers": None, "interleave_moe_layer_step": 2}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("loader") / "base", "llama4", seed=0, **BASE)


@pytest.fixture
def ckpt(base: Checkpoint, tmp_path: Path) -> Path:
    """A private copy of the base checkpoint, free to corrupt."""
    return Path(shutil.copytree(base.path, tmp_path / "ckpt"))


def _rewrite(path: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    """Apply `edit` (None deletes) to model.safetensors and save it back."""
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    for k, v in edit.items():
        if v is None:
            del tensors[k]
        else:
            tensors[k] = v
    save_file(tensors, str(f), metadata={"format": "pt"})
    return f


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_base_loads(base: Checkpoint) -> None:
    model, cfg = load_model(base.path, "float32")
    assert cfg.moe_layers == (1,)
    hf = base.hf.state_dict()
    sd = model.state_dict()
    # spot checks of the name table: fused q|k|v, fused gate|up, transposed experts
    qkv = torch.cat([hf[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(sd["layers.0.attn.qkv.weight"], qkv)
    gate_up = torch.cat([hf[f"model.layers.0.feed_forward.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(sd["layers.0.feed_forward.gate_up.weight"], gate_up)
    assert torch.equal(
        sd["layers.1.feed_forward.experts.w13"],
        hf["model.layers.1.feed_forward.experts.gate_up_proj"].transpose(-1, -2),
    )
    assert torch.equal(sd["lm_head.weight"], hf["lm_head.weight"])


# ---- missing / unexpected / mis-shaped / duplicated ------------------------------------------


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("model.layers.1.self_attn.k_proj.weight", "layers.1.attn.qkv.weight[shard 1]"),
        ("model.layers.0.feed_forward.up_proj.weight", "layers.0.feed_forward.gate_up.weight[shard 1]"),
        ("model.layers.1.feed_forward.experts.gate_up_proj", "layers.1.feed_forward.experts.w13"),
        ("model.layers.1.feed_forward.router.weight", "layers.1.feed_forward.router.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ],
)
def test_missing_tensor(ckpt: Path, key: str, named: str) -> None:
    _rewrite(ckpt, {key: None})
    with pytest.raises(LoadError, match="missing") as e:
        load_model(ckpt, "float32")
    msg = str(e.value)
    assert key in msg, msg  # the checkpoint's own name for the tensor
    assert named in msg, msg
    assert str(ckpt) in msg, msg


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("model.layers.0.self_attn.extra_proj.weight", "no parameter"),
        ("model.layers.7.input_layernorm.weight", "no parameter"),  # layer beyond num_layers
        ("model.rotary_emb.inv_freq", "no parameter"),
        ("model.layers.0.feed_forward.router.weight", "unknown"),  # MoE tensor on a dense layer
        ("model.layers.1.feed_forward.gate_proj.weight", "unknown"),  # dense tensor on a MoE layer
        ("model.layers.0.self_attn.q_proj.bias", "unknown"),  # attention_bias is off
    ],
)
def test_unexpected_tensor(ckpt: Path, key: str, why: str) -> None:
    f = _rewrite(ckpt, {key: torch.zeros(4, 32)})
    with pytest.raises(LoadError, match="unexpected tensor") as e:
        load_model(ckpt, "float32")
    msg = str(e.value)
    assert repr(key) in msg and str(f) in msg and why in msg, msg


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("model.layers.0.self_attn.q_proj.weight", (31, 32)),
        ("model.layers.0.self_attn.v_proj.weight", (32, 16)),  # transposed
        ("model.embed_tokens.weight", (127, 32)),
        ("model.layers.1.feed_forward.experts.down_proj", (4, 32, 16)),  # checked after transform
        ("model.layers.1.input_layernorm.weight", (33,)),
    ],
)
def test_misshaped_tensor(ckpt: Path, key: str, shape: tuple[int, ...]) -> None:
    f = _rewrite(ckpt, {key: torch.zeros(shape)})
    with pytest.raises(LoadError, match="has shape") as e:
        load_model(ckpt, "float32")
    msg = str(e.value)
    assert repr(key) in msg and str(f) in msg and str(shape) in msg, msg


def test_duplicated_tensor_in_two_files(ckpt: Path) -> None:
    key = "model.norm.weight"
    save_file({key: torch.ones(32)}, str(ckpt / "zz-extra.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError, match="second time") as e:
        load_model(ckpt, "float32")
    assert repr(key) in str(e.value) and "zz-extra.safetensors" in str(e.value)


# ---- damaged files ----------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0])
def test_truncated_file(ckpt: Path, keep: float) -> None:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(LoadError) as e:
        load_model(ckpt, "float32")
    assert str(f) in str(e.value)


def test_garbage_file(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(100))
    with pytest.raises(LoadError) as e:
        load_model(ckpt, "float32")
    assert str(f) in str(e.value)


def test_no_safetensors(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"no \*\.safetensors"):
        load_model(ckpt, "float32")


# ---- sharded checkpoints ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(base: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sharded") / "ckpt"
    base.hf.save_pretrained(str(path), max_shard_size="20KB")
    return path


def test_sharded_checkpoint_loads_and_matches(base: Checkpoint, sharded: Path) -> None:
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    ours_sharded, _ = load_model(sharded, "float32")
    ours_single, _ = load_model(base.path, "float32")
    a, b = _state(ours_sharded), _state(ours_single)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and it serves: the engine greedy-decodes the same tokens
    params = {"temperature": 0, "max_new_tokens": 6}
    outs = [
        specdec.Engine(model_path=str(p), dtype="float32", skip_tokenizer_init=True,
                       max_total_tokens=64, log_level="warning")
        .generate(input_ids=[3, 1, 4, 1, 5], sampling_params=params)["output_ids"]
        for p in (sharded, base.path)
    ]
    assert outs[0] == outs[1]


def test_index_naming_missing_shard(sharded: Path, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(sharded, tmp_path / "ckpt"))
    victim = sorted(ckpt.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(LoadError, match="missing shard") as e:
        load_model(ckpt, "float32")
    assert victim.name in str(e.value) and "model.safetensors.index.json" in str(e.value)


def test_unreadable_index(sharded: Path, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(sharded, tmp_path / "ckpt"))
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(LoadError, match="unreadable index"):
        load_model(ckpt, "float32")


def test_sharded_missing_tensor_names_it(sharded: Path, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(sharded, tmp_path / "ckpt"))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    tensors = load_file(str(shard))
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"missing tensor\(s\) model\.layers\.1\.self_attn\.o_proj\.weight"):
        load_model(ckpt, "float32")


# ---- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("auto", torch.float32),  # the checkpoint is fp32
    ],
)
def test_dtype(base: Checkpoint, dtype: str, expected: torch.dtype) -> None:
    model, _ = load_model(base.path, dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    ref = base.hf.state_dict()["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens.weight, ref.to(expected))


def test_auto_dtype_follows_checkpoint(tmp_path: Path) -> None:
    ckpt = save_checkpoint(build_model("llama4", seed=1, **BASE), tmp_path / "bf16",
                           dtype=torch.bfloat16)
    assert json.loads((ckpt.path / "config.json").read_text())["dtype"] == "bfloat16"
    model, _ = load_model(ckpt.path, "auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model32, _ = load_model(ckpt.path, "float32")
    assert {p.dtype for p in model32.parameters()} == {torch.float32}
    assert torch.equal(model32.embed_tokens.weight, model.embed_tokens.weight.float())


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8", ""])
def test_unknown_dtype(base: Checkpoint, dtype: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown dtype '{dtype}'.*bfloat16"):
        load_model(base.path, dtype)
    with pytest.raises(ValueError, match="dtype must be one of"):
        specdec.Engine(model_path=str(base.path), dtype=dtype, skip_tokenizer_init=True)

"""The vision tower and projector against transformers' Llama 4 modules on a tiny config: 2-D
RoPE, pixel shuffle, patch embedding, the whole tower, and strict loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.llama4 import modeling_llama4 as hf_llama4

from specdec.target.config import ConfigError, ModelConfig
from specdec.target.loader import LoadError
from specdec.target.vision import VisionTower, load_vision_tower, pixel_shuffle, rope_2d
from specdec.target.vision_config import VisionConfig

from .tiny_models import Checkpoint, make_checkpoint

TOL = 1e-4  # float32 end to end; only summation order differs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("vision"), "llama4_conditional")


@pytest.fixture(scope="module")
def tower(ckpt: Checkpoint) -> VisionTower:
    return load_vision_tower(ckpt.path, "float32", ModelConfig.from_path(ckpt.path))


def tiles(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # [n, 3, S, S] as normalised pixels


def test_rope_2d_matches_transformers(ckpt: Checkpoint) -> None:
    vcfg = ckpt.hf.config.vision_config
    want = hf_llama4.Llama4VisionRotaryEmbedding._compute_freqs_ci(vcfg)  # [N + 1, 1, D/2]
    got = rope_2d(VisionConfig.from_path(ckpt.path))
    assert got.shape == want[:, 0].shape
    torch.testing.assert_close(got, want[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", [4, 8])
def test_pixel_shuffle_matches_transformers(side: int) -> None:
    x = torch.randn(3, side * side, 12)
    torch.testing.assert_close(pixel_shuffle(x, 0.5), hf_llama4.pixel_shuffle(x, 0.5), atol=0, rtol=0)


def test_patch_embedding_matches_transformers(ckpt: Checkpoint, tower: VisionTower) -> None:
    x = tiles(2, 56)
    with torch.no_grad():
        want = ckpt.hf.vision_model.patch_embedding(x)
    got = tower.vision_model.patch_embedding(x)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("n_tiles", [1, 5])
def test_tower_and_projector_match_transformers(ckpt: Checkpoint, tower: VisionTower, n_tiles: int) -> None:
    x = tiles(n_tiles, 56, seed=n_tiles)
    hf = ckpt.hf
    with torch.no_grad():
        feats = hf.vision_model(x).last_hidden_state  # [tiles, 4, vision_output_dim]
        want = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
    got = tower.embed(x, max_tiles_per_call=2)  # groups of tiles give the same rows
    assert got.shape == (n_tiles * tower.cfg.tokens_per_tile, 32)
    assert tower.cfg.tokens_per_tile == 4
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_loading_is_strict(ckpt: Checkpoint, tmp_path: Path) -> None:
    (f,) = ckpt.path.glob("*.safetensors")
    tensors = load_file(str(f))
    cfg_text = (ckpt.path / "config.json").read_text()
    cfg = ModelConfig.from_path(ckpt.path)

    def write(ts: dict[str, torch.Tensor], name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg_text)
        save_file(ts, str(d / "model.safetensors"))
        return d

    missing = {k: v for k, v in tensors.items() if k != "vision_model.layernorm_post.weight"}
    with pytest.raises(LoadError, match=r"missing vision tensor.*layernorm_post\.weight"):
        load_vision_tower(write(missing, "missing"), "float32", cfg)
    extra = dict(tensors, **{"vision_model.extra.weight": torch.zeros(2)})
    with pytest.raises(LoadError, match=r"unexpected tensor 'vision_model\.extra\.weight'"):
        load_vision_tower(write(extra, "extra"), "float32", cfg)
    bad = dict(tensors, **{"multi_modal_projector.linear_1.weight": torch.zeros(3, 3)})
    with pytest.raises(LoadError, match="has shape"):
        load_vision_tower(write(bad, "shape"), "float32", cfg)


def test_config_refuses_what_the_tower_cannot_run(ckpt: Checkpoint) -> None:
    import json

    raw = json.loads((ckpt.path / "config.json").read_text())
    VisionConfig.from_hf_dict(raw)
    for key, value, match in [("intermediate_size", 48, "intermediate_size"), ("hidden_act", "relu", "hidden_act"),
                              ("image_size", 50, "multiple of patch_size"),
                              ("vision_output_dim", 8, "vision_output_dim")]:
        bad = json.loads(json.dumps(raw))
        bad["vision_config"][key] = value
        with pytest.raises(ConfigError, match=match):
            VisionConfig.from_hf_dict(bad)
    text_only = {k: v for k, v in raw.items() if k != "vision_config"}
    with pytest.raises(ConfigError, match="Llama4ForConditionalGeneration"):
        VisionConfig.from_hf_dict(text_only)

"""Llama 4's vision tower and multi-modal projector: image tiles in, text-width embeddings out.

Per tile [3, S, S] (S = image_size, 336 in the real models):

    patches   = unfold(tile, patch) @ W_patch            # [N, Hv]   N = (S / patch)^2
    x         = cat(patches, class_embedding) + pos_emb  # [N + 1, Hv]  (the class token last)
    x         = layernorm_pre(x), then L encoder layers  # pre-norm, bidirectional, 2-D RoPE
    x         = layernorm_post(x)[:N]                    # the class token dropped
    x         = pixel_shuffle(x, 0.5)                    # [N / 4, 4 Hv]: 2x2 patches -> one row
    x         = gelu(fc2(gelu(fc1(x))))                  # the vision adapter
    embedding = x @ W_proj                               # [N / 4, H_text]

The 2-D RoPE rotates the first half of each head's pairs by the patch's column and the second
half by its row (both counted from 1); the class token is not rotated. Parameter names are the
checkpoint's (`vision_model.*`, `multi_modal_projector.*`), so loading is a strict name match
(`load_vision_tower`). Numerics follow transformers' `Llama4VisionModel` (tests/test_vision.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .loader import SKIP, LoadError, Target, checkpoint_files, fill_weights, resolve_dtype
from .vision_config import VisionConfig

log = logging.getLogger(__name__)

VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def rope_2d(cfg: VisionConfig) -> Tensor:
    """cos + i sin [N + 1, D/2] complex64 for the N patches (row-major) and the class token."""
    side = cfg.patches_per_side
    quarter = cfg.head_dim // 4  # frequencies per axis
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, 2 * quarter, 2)[:quarter].float() / (2 * quarter))
    idx = torch.arange(side * side)
    col = (idx % side + 1).float()  # [N]
    row = (idx // side + 1).float()
    angles = torch.cat((col[:, None] * inv_freq, row[:, None] * inv_freq), dim=-1)  # [N, D/2]
    angles = torch.cat((angles, torch.zeros(1, 2 * quarter)))  # the class token: no rotation
    return torch.polar(torch.ones_like(angles), angles)


def pixel_shuffle(x: Tensor, ratio: float) -> Tensor:
    """[B, N, C] (N a square grid, row-major) -> [B, N * r^2, C / r^2]: each 1/r x 1/r block of
    patches becomes one row, in Llama 4's channel order (two transposed reshapes)."""
    B, N, C = x.shape
    side = int(N**0.5)
    x = x.view(B, side, int(side * ratio), int(C / ratio))
    x = x.permute(0, 2, 1, 3).reshape(B, int(side * ratio), int(side * ratio), int(C / ratio**2))
    return x.permute(0, 2, 1, 3).reshape(B, -1, int(C / ratio**2))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=True) for _ in range(4))

    def forward(self, x: Tensor, cis: Tensor) -> Tensor:  # x [B, L, Hv], cis [L, D/2]
        B, L, _ = x.shape
        H, D = self.num_heads, self.head_dim

        def rotate(t: Tensor) -> Tensor:  # [B, L, H, D], adjacent pairs as complex numbers
            tc = torch.view_as_complex(t.float().reshape(B, L, H, D // 2, 2))
            return torch.view_as_real(tc * cis[None, :, None, :]).flatten(3).to(t.dtype)

        q = rotate(self.q_proj(x).view(B, L, H, D)).transpose(1, 2)  # [B, H, L, D]
        k = rotate(self.k_proj(x).view(B, L, H, D)).transpose(1, 2)
        v = self.v_proj(x).view(B, L, H, D).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=D**-0.5)  # bidirectional
        return self.o_proj(out.transpose(1, 2).reshape(B, L, H * D))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: Tensor, cis: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cis)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_layers))


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch = cfg.patch_size
        self.linear = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size, bias=False)

    def forward(self, pixels: Tensor) -> Tensor:  # [B, C, S, S] -> [B, N, Hv]
        cols = F.unfold(pixels, kernel_size=self.patch, stride=self.patch)  # [B, C p p, N]
        return self.linear(cols.transpose(1, 2))


class AdapterMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.intermediate_size, cfg.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(cfg.projector_output_dim, cfg.projector_output_dim, bias=False)


class VisionAdapter(nn.Module):
    """Pixel shuffle, then a two-layer MLP with GELU after each layer."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = AdapterMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, Hv] -> [B, N r^2, out]
        x = pixel_shuffle(x, self.ratio)
        return F.gelu(self.mlp.fc2(F.gelu(self.mlp.fc1(x))))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        n = cfg.patches_per_side**2
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(n + 1, cfg.hidden_size))
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size)
        self.model = VisionEncoder(cfg)
        self.vision_adapter = VisionAdapter(cfg)
        self.register_buffer("cis", rope_2d(cfg), persistent=False)

    def forward(self, pixels: Tensor) -> Tensor:  # [B, C, S, S] -> [B, N r^2, vision_output_dim]
        x = self.patch_embedding(pixels)  # [B, N, Hv]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat((x, cls), dim=1) + self.positional_embedding_vlm.to(x.dtype)
        x = self.layernorm_pre(x)
        for layer in self.model.layers:
            x = layer(x, self.cis)
        x = self.layernorm_post(x)[:, :-1]
        return self.vision_adapter(x)


class Projector(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cfg.vision_output_dim, cfg.text_hidden_size, bias=False)


class VisionTower(nn.Module):
    """The vision model and the projector: `embed(tiles)` gives the rows that replace the
    <|patch|> tokens' embeddings, tile by tile."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionModel(cfg)
        self.multi_modal_projector = Projector(cfg)

    @torch.inference_mode()
    def embed(self, pixel_values: Tensor, max_tiles_per_call: int = 8) -> Tensor:
        """pixel_values [tiles, C, S, S] -> [tiles * tokens_per_tile, H_text], in the tower's
        dtype (tiles run in groups to bound the activations)."""
        p = next(self.parameters())
        out = []
        for group in pixel_values.split(max_tiles_per_call):
            feats = self.vision_model(group.to(device=p.device, dtype=p.dtype))  # [g, n, out]
            out.append(self.multi_modal_projector.linear_1(feats.flatten(0, 1)))
        return torch.cat(out)


def load_vision_tower(model_path: str | Path, dtype: str, text_cfg: ModelConfig) -> VisionTower:
    """Build the tower on meta, materialise it, fill every parameter from the checkpoint's
    vision_model.* / multi_modal_projector.* tensors exactly once (strict both ways, as the text
    model: `fill_weights`)."""
    t0 = time.perf_counter()
    path = Path(model_path)
    cfg = VisionConfig.from_path(path)
    if cfg.text_hidden_size != text_cfg.hidden_size:
        raise LoadError(f"vision projector width {cfg.text_hidden_size} != text hidden_size {text_cfg.hidden_size}")
    with torch.device("meta"):
        tower = VisionTower(cfg)
    tower = tower.to(dtype=resolve_dtype(dtype, text_cfg)).to_empty(device="cpu")
    tower.requires_grad_(False)
    tower.vision_model.cis = rope_2d(cfg)  # (buffers come back uninitialised from meta)
    def lookup(key: str) -> Target:  # the tower's parameters carry the checkpoint's names
        return Target(key) if key.startswith(VISION_PREFIXES) else SKIP

    units = fill_weights(tower, lookup, checkpoint_files(path), "the vision tower")
    missing = [name for name, _, _ in units]
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise LoadError(f"checkpoint {path} is missing vision tensor(s) {', '.join(missing[:8])}{more}")
    tower.eval()
    log.info("loaded the vision tower (%d layers, %d tokens per %dpx tile) in %.1fs", cfg.num_layers,
             cfg.tokens_per_tile, cfg.image_size, time.perf_counter() - t0)
    return tower

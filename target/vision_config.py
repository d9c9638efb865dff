"""Llama 4's vision configuration: the `vision_config` of a `Llama4ForConditionalGeneration`
checkpoint and the image token ids of its top level, parsed strictly.

Defaults follow `transformers.Llama4VisionConfig` / `Llama4Config` (the real Scout and Maverick
checkpoints set every field). Anything the vision tower cannot run exactly raises ConfigError.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError


@dataclass(frozen=True, slots=True)
class VisionConfig:
    hidden_size: int  # 1408 in Scout / Maverick
    num_layers: int  # 34
    num_heads: int  # 16
    intermediate_size: int  # 5632: the encoder MLP, and the pixel-shuffled width
    vision_output_dim: int  # 4096: the adapter's output, the projector's input
    image_size: int  # 336: one tile's side in pixels
    patch_size: int  # 14
    num_channels: int
    pixel_shuffle_ratio: float  # 0.5: 2x2 patches -> one token
    projector_input_dim: int
    projector_output_dim: int
    rope_theta: float
    text_hidden_size: int  # the projector's output: the text model's embedding width
    image_token_id: int  # <|patch|>: the positions that take image embeddings
    boi_token_id: int  # <|image_start|>
    eoi_token_id: int  # <|image_end|>

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(f"vision hidden_size {self.hidden_size} / {self.num_heads} heads must give a "
                              "head_dim divisible by 4 (2-D RoPE)")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size "
                              f"{self.patch_size}")
        inv = 1 / self.pixel_shuffle_ratio
        if inv != round(inv) or self.patches_per_side % round(inv):
            raise ConfigError(f"pixel_shuffle_ratio {self.pixel_shuffle_ratio} does not divide the "
                              f"{self.patches_per_side}x{self.patches_per_side} patch grid")
        if self.intermediate_size != int(self.hidden_size / self.pixel_shuffle_ratio**2):
            raise ConfigError(f"vision intermediate_size {self.intermediate_size} must equal hidden_size / "
                              f"pixel_shuffle_ratio^2 = {self.hidden_size / self.pixel_shuffle_ratio**2:g} "
                              "(the adapter's input is the pixel-shuffled encoder output)")
        if self.projector_input_dim != self.projector_output_dim:
            raise ConfigError("projector_input_dim must equal projector_output_dim (the adapter's fc2 takes "
                              "fc1's output)")
        if self.projector_output_dim != self.vision_output_dim:
            raise ConfigError(f"vision_output_dim {self.vision_output_dim} must equal projector_output_dim "
                              f"{self.projector_output_dim} (the projector takes the adapter's output)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Image embeddings (<|patch|> tokens) one tile gives after pixel shuffle."""
        return int(self.patches_per_side**2 * self.pixel_shuffle_ratio**2)

    @classmethod
    def from_path(cls, model_path: str | Path) -> VisionConfig:
        path = Path(model_path) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        return cls.from_hf_dict(raw)

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> VisionConfig:
        vision = raw.get("vision_config")
        text = raw.get("text_config")
        if not isinstance(vision, Mapping) or not isinstance(text, Mapping):
            raise ConfigError("--enable-multimodal needs a Llama4ForConditionalGeneration checkpoint "
                              "(config.json with vision_config and text_config)")
        act = vision.get("hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"vision hidden_act {act!r} is not supported (Llama 4 uses gelu)")
        strategy = vision.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ConfigError(f"vision_feature_select_strategy {strategy!r} is not supported")
        if vision.get("multi_modal_projector_bias", False):
            raise ConfigError("multi_modal_projector_bias = true is not supported (Llama 4 has none)")
        rope = vision.get("rope_parameters") or {}
        theta = rope.get("rope_theta", vision.get("rope_theta")) or 10000.0

        def side(key: str, default: int) -> int:
            value = vision.get(key, default)
            if isinstance(value, (list, tuple)):
                if len(value) != 2 or value[0] != value[1]:
                    raise ConfigError(f"vision {key} {value} must be square")
                value = value[0]
            return int(value)

        return cls(
            hidden_size=int(vision.get("hidden_size", 768)),
            num_layers=int(vision.get("num_hidden_layers", 34)),
            num_heads=int(vision.get("num_attention_heads", 16)),
            intermediate_size=int(vision.get("intermediate_size", 5632)),
            vision_output_dim=int(vision.get("vision_output_dim", 7680)),
            image_size=side("image_size", 448),
            patch_size=side("patch_size", 14),
            num_channels=int(vision.get("num_channels", 3)),
            pixel_shuffle_ratio=float(vision.get("pixel_shuffle_ratio", 0.5)),
            projector_input_dim=int(vision.get("projector_input_dim", 4096)),
            projector_output_dim=int(vision.get("projector_output_dim", 4096)),
            rope_theta=float(theta),
            text_hidden_size=int(text.get("hidden_size", 5120)),
            image_token_id=int(raw.get("image_token_index", raw.get("image_token_id", 200092))),
            boi_token_id=int(raw.get("boi_token_index", 200080)),
            eoi_token_id=int(raw.get("eoi_token_index", 200081)),
        )

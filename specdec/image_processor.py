"""Llama 4 image preprocessing: a PIL image -> tiles of normalised pixels, and the prompt
tokens that stand for them.

The arithmetic follows transformers' `Llama4ImageProcessor` (image_processing_llama4.py) and
`Llama4Processor._prompt_split_image`, so the vision tower sees what it was trained on:

1. Canvas. The candidates are every (rows x cols) grid of `tile_size` tiles with at most
   `max_patches` tiles (`supported_canvases`). `best_canvas` picks the one the image fits with
   the least change of scale: the smallest upscale if any canvas needs none of a downscale,
   else the mildest downscale; ties go to the smallest area.
2. Resize. Without `resize_to_max_canvas` an image is never upscaled past its own size or one
   tile per side (a 200x700 image on a 336x1008 canvas stays 200x700); it is resized with PIL
   BILINEAR, keeping its aspect ratio (`fit_without_distortion`).
3. Pad bottom/right with 0 to the canvas, rescale and normalise in bfloat16 as the reference
   does (`rescale_normalize`), and cut into tiles, row-major.
4. If there is more than one tile, append a global tile: the whole image squeezed to
   tile x tile (aspect ratio not kept).

What the reference computes with torch tensors is reproduced with the same precision: the
canvas scales are float32 (they come from an int64 canvas tensor), and so is a resize side
whose bound came from that tensor (`plan_tiles`). The one deliberate difference is the resize
kernel: PIL's BILINEAR here, torchvision's antialiased bilinear on a uint8 tensor there; the
two differ by at most one grey level on a small fraction of pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from .sampling_params import is_int, is_number

__all__ = [
    "ImageProcessorConfig",
    "ImageTokens",
    "ProcessedImage",
    "TilePlan",
    "best_canvas",
    "fit_without_distortion",
    "image_prompt_ids",
    "patches_per_tile",
    "plan_tiles",
    "preprocess",
    "rescale_normalize",
    "supported_canvases",
    "to_rgb",
]

_PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR: the only `resample` the reference uses


@dataclass(frozen=True, slots=True)
class ImageProcessorConfig:
    """How images are cut into tiles; defaults are Llama 4 Scout / Maverick's
    `preprocessor_config.json`."""

    tile_size: int = 336  # one tile's side in pixels (the vision tower's image_size)
    max_patches: int = 16  # at most this many tiles per image (the global tile not counted)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255  # uint8 -> [0, 1]
    resize_to_max_canvas: bool = False  # True: upscale to the largest canvas the image fits

    def __post_init__(self) -> None:
        if not is_int(self.tile_size) or self.tile_size < 1:
            raise ValueError(f"tile_size must be a positive integer, got {self.tile_size!r}")
        if not is_int(self.max_patches) or self.max_patches < 1:
            raise ValueError(f"max_patches must be a positive integer, got {self.max_patches!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(is_number(v) for v in value):
                raise ValueError(f"{name} must be three numbers (R, G, B), got {value!r}")
        if not all(self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std!r}")
        if not is_number(self.rescale_factor) or self.rescale_factor <= 0:
            raise ValueError(f"rescale_factor must be a positive number, got {self.rescale_factor!r}")
        if not isinstance(self.resize_to_max_canvas, bool):
            raise ValueError(f"resize_to_max_canvas must be a bool, got {self.resize_to_max_canvas!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessorConfig:
        """Read a `preprocessor_config.json` dict. Keys this processor has no use for are
        ignored; a known key whose value asks for another pipeline (a non-square size, a
        resampling filter other than bilinear, a disabled step) raises ValueError."""
        kwargs: dict[str, Any] = {}
        size = d.get("size")
        if size is not None:
            if not isinstance(size, Mapping) or "height" not in size or "width" not in size:
                raise ValueError(f"preprocessor size must be {{'height': H, 'width': W}}, got {size!r}")
            if size["height"] != size["width"]:
                raise ValueError(f"preprocessor size must be square, got {size['height']}x{size['width']}")
            kwargs["tile_size"] = size["height"]
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                value = d[key]
                kwargs[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
        for key in ("max_patches", "rescale_factor", "resize_to_max_canvas"):
            if d.get(key) is not None:
                kwargs[key] = d[key]
        for step in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(step) is False:
                raise ValueError(f"preprocessor {step} = false is not supported (Llama 4 always does it)")
        if d.get("resample") not in (None, _PIL_BILINEAR):
            raise ValueError(f"preprocessor resample {d['resample']!r} is not supported (Llama 4 uses "
                             f"bilinear, {_PIL_BILINEAR})")
        return cls(**kwargs)

    @classmethod
    def from_vision(cls, image_size: int) -> ImageProcessorConfig:
        """The defaults with tiles of the vision tower's `image_size` (for a checkpoint without
        a preprocessor_config.json)."""
        return cls(tile_size=image_size)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]  # ascending


def supported_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Every (height, width) made of rows x cols tiles with rows * cols <= max_tiles, grouped by
    aspect ratio rows / cols in the order each ratio first appears when counting tiles down
    from max_tiles (transformers' `find_supported_resolutions`; the order decides ties in
    `best_canvas`). max_tiles=4, tile=1: [(1,4), (2,2), (1,1), (4,1), (1,3), (3,1), (1,2), (2,1)].
    """
    if max_tiles < 1 or tile < 1:
        raise ValueError(f"max_tiles and tile must be >= 1, got {max_tiles}, {tile}")
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for rows in _divisors(n):
            cols = n // rows
            by_ratio.setdefault(rows / cols, []).append((rows * tile, cols * tile))
    return [canvas for group in by_ratio.values() for canvas in group]


def _scale32(image_hw: tuple[int, int], canvas: tuple[int, int]) -> np.float32:
    """The largest scale that fits the image in the canvas, in float32 as the reference's
    `int64 tensor / int` division gives it: min(H / h, W / w)."""
    scale_h = np.float32(canvas[0]) / np.float32(image_hw[0])
    scale_w = np.float32(canvas[1]) / np.float32(image_hw[1])
    return scale_w if scale_h > scale_w else scale_h


def best_canvas(image_hw: tuple[int, int], canvases: Sequence[tuple[int, int]],
                resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The canvas (height, width) an image of `image_hw` is placed on (transformers'
    `get_best_fit`). Each canvas's scale is min(H / h, W / w) in float32. Among scales >= 1 take
    the smallest (the largest with resize_to_max_canvas); if there are none, take the largest
    (downscale as little as possible). Canvases with exactly that scale tie; the smallest area
    wins, the first in `canvases` among equal areas."""
    if not canvases:
        raise ValueError("no canvases to choose from")
    h, w = image_hw
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    scales = [_scale32(image_hw, canvas) for canvas in canvases]
    upscales = [s for s in scales if s >= 1]
    if upscales:
        chosen = max(upscales) if resize_to_max_canvas else min(upscales)
    else:
        chosen = max(scales)  # all < 1: the mildest downscale
    tied = [canvas for canvas, s in zip(canvases, scales) if s == chosen]
    # min() keeps the first of equal areas, as torch.argmin does
    best = min(tied, key=lambda canvas: canvas[0] * canvas[1])
    return int(best[0]), int(best[1])


def _fit(image_hw: tuple[int, int], target_hw: tuple[int, int],
         float32_sides: tuple[bool, bool]) -> tuple[int, int]:
    """`fit_without_distortion` with each target side's scale computed in float32 when
    float32_sides says so (height, width), float64 otherwise; a comparison that involves a
    float32 scale is done in float32, as torch compares a float32 tensor with a Python float."""
    h, w = image_hw
    target_h, target_w = target_hw
    scale_h: float | np.float32 = (np.float32(target_h) / np.float32(h) if float32_sides[0]
                                   else target_h / h)
    scale_w: float | np.float32 = (np.float32(target_w) / np.float32(w) if float32_sides[1]
                                   else target_w / w)
    width_limits = bool(np.float32(scale_w) < np.float32(scale_h) if any(float32_sides)
                        else scale_w < scale_h)
    if width_limits:  # the width fills the target; the height follows
        product = np.float32(h) * scale_w if float32_sides[1] else h * scale_w
        return min(math.floor(product), target_h), target_w
    product = np.float32(w) * scale_h if float32_sides[0] else w * scale_h
    return target_h, min(math.floor(product), target_w)


def fit_without_distortion(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) with the image's aspect ratio that fits in `target_hw`
    (transformers' `get_max_res_without_distortion`, in float64): the limiting side takes the
    target's size, the other is floored. (200, 300) in (450, 200) -> (133, 200)."""
    return _fit(image_hw, target_hw, (False, False))


class TilePlan(NamedTuple):
    """Where an image goes: resized to `resized`, padded to `canvas`, cut into `grid` tiles."""

    canvas: tuple[int, int]  # (H, W), multiples of tile_size
    resized: tuple[int, int]  # (h, w) <= canvas: the image after resizing, before padding
    grid: tuple[int, int]  # (rows, cols) = canvas // tile_size


def plan_tiles(image_hw: tuple[int, int], cfg: ImageProcessorConfig) -> TilePlan:
    """The canvas, resized size and tile grid for an image of `image_hw` (the size logic of
    `Llama4ImageProcessor._preprocess`)."""
    canvases = supported_canvases(cfg.max_patches, cfg.tile_size)
    canvas = best_canvas(image_hw, canvases, cfg.resize_to_max_canvas)
    if cfg.resize_to_max_canvas:
        target, float32_sides = canvas, (True, True)
    else:
        # Upscale no further than the image's own side or one tile: target = min(max(side, tile),
        # canvas side). The reference takes the canvas side (a tensor element: float32 from then
        # on) only when it is strictly smaller; on a tie min() keeps the Python int.
        bounds = (max(image_hw[0], cfg.tile_size), max(image_hw[1], cfg.tile_size))
        target = (min(bounds[0], canvas[0]), min(bounds[1], canvas[1]))
        float32_sides = (canvas[0] < bounds[0], canvas[1] < bounds[1])
    new_h, new_w = _fit(image_hw, target, float32_sides)
    grid = (canvas[0] // cfg.tile_size, canvas[1] // cfg.tile_size)
    return TilePlan(canvas=canvas, resized=(max(new_h, 1), max(new_w, 1)), grid=grid)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency (an alpha band, or a palette / grey transparency key)
    composited onto white, as transformers' `convert_to_rgb` does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def rescale_normalize(pixels: torch.Tensor, cfg: ImageProcessorConfig) -> torch.Tensor:
    """uint8 pixels [3, H, W] -> float32 [3, H, W] holding the reference's bfloat16 values:
    bf16(x) * rescale_factor, then (. - mean) / std, each step rounded to bfloat16 (the mean and
    std themselves cast to bfloat16 first), as `Llama4ImageProcessor.rescale_and_normalize`."""
    x = pixels.to(torch.bfloat16) * cfg.rescale_factor
    mean = torch.tensor(cfg.image_mean, dtype=torch.bfloat16).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.bfloat16).view(3, 1, 1)
    return ((x - mean) / std).float()


def _resize(image: Image.Image, hw: tuple[int, int]) -> Image.Image:
    if image.size == (hw[1], hw[0]):
        return image  # the reference skips an identity resize too
    return image.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)


def _chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # [3, h, w] uint8


@dataclass(frozen=True)
class ProcessedImage:
    """One image's tiles, ready for the vision tower."""

    # [tiles, 3, S, S] float32; tiles = rows * cols, plus the global tile last when that is > 1
    pixel_values: torch.Tensor
    grid: tuple[int, int]  # (rows, cols): the prompt's tile layout

    def __post_init__(self) -> None:
        rows, cols = self.grid
        expected = rows * cols + (1 if rows * cols > 1 else 0)
        if self.pixel_values.dim() != 4 or self.pixel_values.shape[0] != expected:
            raise ValueError(f"grid {rows}x{cols} needs {expected} tiles, got pixel_values of shape "
                             f"{tuple(self.pixel_values.shape)}")

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


def preprocess(image: Image.Image, cfg: ImageProcessorConfig) -> ProcessedImage:
    """Tile one image (see the module docstring for the steps)."""
    rgb = to_rgb(image)
    plan = plan_tiles((rgb.height, rgb.width), cfg)
    size = cfg.tile_size
    (canvas_h, canvas_w), (h, w), (rows, cols) = plan
    # pad in uint8 with 0 before normalising, as the reference pads its uint8 tensor
    padded = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
    padded[:h, :w] = np.asarray(_resize(rgb, plan.resized))
    pixels = rescale_normalize(torch.from_numpy(padded).permute(2, 0, 1), cfg)  # [3, H, W]
    # [3, rows*S, cols*S] -> [3, rows, S, cols, S] -> [rows, cols, 3, S, S]: tile (y, x) at y*cols + x
    tiles = pixels.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
    if rows * cols > 1:
        global_tile = rescale_normalize(_chw(_resize(rgb, (size, size))), cfg)  # [3, S, S]
        tiles = torch.cat([tiles, global_tile[None]])
    return ProcessedImage(pixel_values=tiles.contiguous(), grid=plan.grid)


@dataclass(frozen=True, slots=True)
class ImageTokens:
    """The ids of Llama 4's image tokens."""

    image_start: int  # <|image_start|>
    image_end: int  # <|image_end|>
    image: int  # <|image|>: introduces the global tile
    patch: int  # <|patch|>: one image embedding
    tile_x_separator: int  # <|tile_x_separator|>: between tiles of a row
    tile_y_separator: int  # <|tile_y_separator|>: after each row


def patches_per_tile(tile_size: int, patch_size: int, pixel_shuffle_ratio: float) -> int:
    """<|patch|> tokens per tile: (tile / patch)^2 patches, pixel shuffle merging
    1 / ratio^2 of them into one. 336, 14, 0.5 -> 24^2 // 4 = 144."""
    if tile_size < 1 or patch_size < 1 or pixel_shuffle_ratio <= 0:
        raise ValueError(f"tile_size, patch_size and pixel_shuffle_ratio must be positive, got "
                         f"{tile_size}, {patch_size}, {pixel_shuffle_ratio}")
    return (tile_size // patch_size) ** 2 // round(1 / pixel_shuffle_ratio**2)


def image_prompt_ids(grid: tuple[int, int], patches_per_tile: int, tokens: ImageTokens) -> list[int]:
    """The prompt ids for one image (`_prompt_split_image`). With more than one tile, each row's
    tiles come first, x-separated, each row ending in a y-separator; then, always, <|image|> and
    one tile's patches (the global tile, or the only tile). Grid (1, 2), P = patches:
    <|image_start|> P <|tile_x_separator|> P <|tile_y_separator|> <|image|> P <|image_end|>."""
    rows, cols = grid
    tile = [tokens.patch] * patches_per_tile
    ids = [tokens.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                ids += tile
                if x < cols - 1:
                    ids.append(tokens.tile_x_separator)
            ids.append(tokens.tile_y_separator)
    ids.append(tokens.image)
    ids += tile
    ids.append(tokens.image_end)
    return ids

"""Llama 4 image tiling (specdec/image_processor.py): hand-worked canvases and resize sizes,
the canvas / fit rules against transformers' own functions on random sizes (including the
float32 cases where the reference's tensor arithmetic gives a different floor than float64),
the pixels of each tile, the bfloat16 rescale / normalise rounding, and the prompt layout."""

from __future__ import annotations

import itertools
import random
import sys
import types
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from specdec.image_processor import (
    ImageProcessorConfig,
    ImageTokens,
    ProcessedImage,
    best_canvas,
    fit_without_distortion,
    image_prompt_ids,
    patches_per_tile,
    plan_tiles,
    preprocess,
    rescale_normalize,
    supported_canvases,
    to_rgb,
)

CFG = ImageProcessorConfig()
S = CFG.tile_size  # 336
_TORCHVISION = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                "torchvision.transforms.v2.functional")
_REF_MODULE = "transformers.models.llama4.image_processing_llama4"


@pytest.fixture(scope="module")
def ref() -> Iterator[types.ModuleType]:
    """transformers' image_processing_llama4, imported with torchvision stubbed out (it imports
    torchvision's functional at import time; the functions compared here use only torch). The
    stubs and the module are removed again afterwards."""
    import importlib

    import transformers.image_processing_backends  # noqa: F401  (decides torchvision is absent, unstubbed)

    if _REF_MODULE in sys.modules:
        pytest.skip(f"{_REF_MODULE} is already imported (a real torchvision?)")
    with pytest.MonkeyPatch.context() as mp:
        stubs = {name: types.ModuleType(name) for name in _TORCHVISION}
        for name, module in stubs.items():
            mp.setitem(sys.modules, name, module)
        for parent, child in itertools.pairwise(_TORCHVISION):
            setattr(stubs[parent], child.rsplit(".", 1)[1], stubs[child])
        try:
            module = importlib.import_module(_REF_MODULE)
        except Exception as e:  # any failure means the stubs are not enough
            pytest.skip(f"cannot import {_REF_MODULE} with torchvision stubbed: {e!r}")
        try:
            yield module
        finally:
            sys.modules.pop(_REF_MODULE, None)
            package = sys.modules.get(_REF_MODULE.rsplit(".", 1)[0])
            if package is not None and "image_processing_llama4" in vars(package):
                delattr(package, "image_processing_llama4")


def _size_dict(tile: int):  # type: ignore[no-untyped-def]
    from transformers.image_utils import SizeDict

    return SizeDict(height=tile, width=tile)


def ref_plan(ref: types.ModuleType, hw: tuple[int, int], cfg: ImageProcessorConfig
             ) -> tuple[tuple[int, int], tuple[int, int]]:
    """(canvas, resized size) as `Llama4ImageProcessor._preprocess` computes them, with its
    types: a torch.Size image size and the canvas as a row of an int64 tensor."""
    size = _size_dict(cfg.tile_size)
    resolutions = torch.tensor(ref.find_supported_resolutions(cfg.max_patches, size))
    image_size = torch.Size(hw)
    target = ref.get_best_fit(image_size, resolutions, resize_to_max_canvas=cfg.resize_to_max_canvas)
    if cfg.resize_to_max_canvas:
        bounded = target
    else:
        bounded = (min(max(image_size[0], size.height), target[0]),
                   min(max(image_size[1], size.height), target[1]))
    new = ref.get_max_res_without_distortion(image_size, bounded)
    return (int(target[0]), int(target[1])), (max(int(new[0]), 1), max(int(new[1]), 1))


# ---------------------------------------------------------------------------------- canvases

def test_canvas_list_small_example() -> None:
    # n = 4: (1,4) ratio 1/4, (2,2) ratio 1, (4,1) ratio 4; n = 3: (1,3), (3,1); n = 2: (1,2),
    # (2,1); n = 1: (1,1) joins ratio 1, after (2,2). Groups in first-seen order.
    assert supported_canvases(4, 1) == [(1, 4), (2, 2), (1, 1), (4, 1), (1, 3), (3, 1), (1, 2), (2, 1)]
    assert supported_canvases(1, 336) == [(336, 336)]
    assert len(supported_canvases(16, 336)) == 50  # sum of the divisor counts of 1..16


@pytest.mark.parametrize(("max_tiles", "tile"), [(16, 336), (4, 224), (1, 336), (30, 14), (7, 448)])
def test_canvas_list_matches_transformers(ref: types.ModuleType, max_tiles: int, tile: int) -> None:
    assert supported_canvases(max_tiles, tile) == ref.find_supported_resolutions(max_tiles, _size_dict(tile))


# (h, w), resize_to_max_canvas -> canvas, resized, grid; canvases are 336 x (rows, cols) with
# rows * cols <= 16, scale = min(H / h, W / w).
HAND_CASES = [
    # square, small: every canvas with a 336 side gives 336/100 = 3.36, the smallest upscale;
    # smallest area (336, 336). Bound per side min(max(100, 336), 336) = 336: scale 3.36 both
    # ways, so 100 -> 336 on both sides.
    ((100, 100), False, (336, 336), (336, 336), (1, 1)),
    # wide: W >= 700 needs 3 columns (1008): 1008/700 = 1.44 < 336/200 = 1.68, the smallest
    # upscale, reached by (336, 1008) and taller ones: smallest area (336, 1008). Bound
    # (min(max(200, 336), 336), min(max(700, 336), 1008)) = (336, 700): width limits (scale 1.0),
    # so the image keeps its 200 x 700.
    ((200, 700), False, (336, 1008), (200, 700), (1, 3)),
    # tall: H >= 1000 needs 3 rows (1008): scale min(1008/1000, 336/300) = 1.008, smallest area
    # (1008, 336). Bound (1000, 336): height limits (scale 1.0), no resize.
    ((1000, 300), False, (1008, 336), (1000, 300), (3, 1)),
    # huge: nothing upscales (3000 x 4000 would need 9 x 12 tiles). The mildest downscale is
    # 0.336, by (1008, 1344) = min(1008/3000, 1344/4000), (1344, 1344) and (1008, 1680); more
    # would need >= 4 x 5 tiles. Smallest area 1008 * 1344. Bound (1008, 1344): both scales
    # 0.336 -> (1008, floor(4000 * 0.336)) = (1008, 1344).
    ((3000, 4000), False, (1008, 1344), (1008, 1344), (3, 4)),
    # tiny: (336, 336) at 67.2, upscaled to fill it: floor(5 * 67.2) = 336.
    ((5, 5), False, (336, 336), (336, 336), (1, 1)),
    # small and wide: (336, 336) at min(3.36, 1.12) = 1.12; width limits: (floor(100 * 1.12), 336).
    ((100, 300), False, (336, 336), (112, 336), (1, 1)),
    # resize_to_max_canvas: the largest upscale. (672, 2016) gives min(6.72, 6.72); (672, 2352)
    # and (672, 2688) tie at 6.72 by height; nothing larger fits 16 tiles (3 rows would need
    # W >= 3024: 9 columns). Smallest area (672, 2016). The scales are float32 there:
    # float32(2016 / 300) = 6.7199997..., 300 * that = 2015.9999 -> 2015, not 2016.
    ((100, 300), True, (672, 2016), (672, 2015), (2, 6)),
]


@pytest.mark.parametrize(("hw", "to_max", "canvas", "resized", "grid"), HAND_CASES)
def test_hand_worked_plans(hw: tuple[int, int], to_max: bool, canvas: tuple[int, int],
                           resized: tuple[int, int], grid: tuple[int, int]) -> None:
    plan = plan_tiles(hw, ImageProcessorConfig(resize_to_max_canvas=to_max))
    assert (plan.canvas, plan.resized, plan.grid) == (canvas, resized, grid)


@pytest.mark.parametrize(("hw", "to_max", "canvas", "resized", "grid"), HAND_CASES)
def test_hand_worked_plans_match_transformers(ref: types.ModuleType, hw: tuple[int, int], to_max: bool,
                                              canvas: tuple[int, int], resized: tuple[int, int],
                                              grid: tuple[int, int]) -> None:
    assert ref_plan(ref, hw, ImageProcessorConfig(resize_to_max_canvas=to_max)) == (canvas, resized)


# Sizes where the reference's float32 (a bound taken from the canvas tensor) floors to a different
# side than float64 would: 640 x 6000 on (336, 3360): 6000 * float32(336 / 640) = 3149.99..
FLOAT32_CASES = [
    ((640, 6000), False, (336, 3149)),
    ((1232, 3333), False, (672, 1818)),
    ((25, 300), True, (336, 4031)),
    ((44, 77), True, (960, 1680)),
]


@pytest.mark.parametrize(("hw", "to_max", "resized"), FLOAT32_CASES)
def test_float32_floors_follow_the_reference(ref: types.ModuleType, hw: tuple[int, int], to_max: bool,
                                             resized: tuple[int, int]) -> None:
    cfg = ImageProcessorConfig(resize_to_max_canvas=to_max)
    plan = plan_tiles(hw, cfg)
    assert plan.resized == resized
    assert ref_plan(ref, hw, cfg) == (plan.canvas, resized)
    # the float64 rule on the same bound gives the other answer: the float32 path matters
    bound = plan.canvas if to_max else (min(max(hw[0], S), plan.canvas[0]), min(max(hw[1], S), plan.canvas[1]))
    assert fit_without_distortion(hw, bound) != resized


def _random_sizes(rng: random.Random, n: int) -> list[tuple[int, int]]:
    sizes = []
    for _ in range(n):
        top = rng.choice([8, 60, 400, 3000, 12000])
        sizes.append((rng.randint(1, top), rng.randint(1, top)))
    return sizes


@pytest.mark.parametrize("cfg", [
    ImageProcessorConfig(),
    ImageProcessorConfig(resize_to_max_canvas=True),
    ImageProcessorConfig(tile_size=224, max_patches=4),
    ImageProcessorConfig(tile_size=100, max_patches=9, resize_to_max_canvas=True),
], ids=["default", "max-canvas", "224x4", "100x9-max"])
def test_random_sizes_match_transformers(ref: types.ModuleType, cfg: ImageProcessorConfig) -> None:
    rng = random.Random(cfg.tile_size * 31 + cfg.max_patches)
    canvases = supported_canvases(cfg.max_patches, cfg.tile_size)
    resolutions = torch.tensor(canvases)
    for hw in _random_sizes(rng, 300):
        expected = ref.get_best_fit(torch.Size(hw), resolutions, resize_to_max_canvas=cfg.resize_to_max_canvas)
        assert best_canvas(hw, canvases, cfg.resize_to_max_canvas) == tuple(expected.tolist()), hw
        target = rng.choice(canvases)
        assert fit_without_distortion(hw, target) == ref.get_max_res_without_distortion(hw, target), (hw, target)
        plan = plan_tiles(hw, cfg)
        assert (plan.canvas, plan.resized) == ref_plan(ref, hw, cfg), hw


def test_best_canvas_ties_pick_smallest_area_then_first() -> None:
    # 100 x 100 fits (336, 336) and (336, 672) at the same 3.36: the smaller area wins
    assert best_canvas((100, 100), [(336, 672), (336, 336)]) == (336, 336)
    # equal areas and equal scales: the first listed wins, as torch.argmin
    assert best_canvas((10, 10), [(20, 40), (40, 20)]) == (20, 40)
    assert best_canvas((10, 10), [(40, 20), (20, 40)]) == (40, 20)
    # no upscale possible: the mildest downscale, min(100/400, 200/400) = 0.25 vs 0.5
    assert best_canvas((400, 400), [(100, 200), (200, 200)]) == (200, 200)


def test_fit_without_distortion_examples() -> None:
    # width limits: 200/300 < 450/200 -> width 200, height floor(200 * 2/3) = 133
    assert fit_without_distortion((200, 300), (450, 200)) == (133, 200)
    # height limits: 450/800 < 1300/600 -> height 450, width floor(600 * 0.5625) = 337
    assert fit_without_distortion((800, 600), (450, 1300)) == (450, 337)


# ---------------------------------------------------------------------------------- pixels

def _bf16_reference(pixels: np.ndarray, cfg: ImageProcessorConfig = CFG) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W]: the reference's steps, written out with torch."""
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).to(torch.bfloat16)  # a writable copy
    x = x * cfg.rescale_factor
    mean = torch.as_tensor(cfg.image_mean, dtype=torch.bfloat16).view(-1, 1, 1)
    std = torch.as_tensor(cfg.image_std, dtype=torch.bfloat16).view(-1, 1, 1)
    return x.sub(mean).div_(std).float()


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), as float32: the top 16 bits."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.astype(np.uint32).view(np.float32)


def test_rescale_normalize_rounding() -> None:
    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([values] * 3, axis=-1)[None]  # [1, 256, 3]
    got = rescale_normalize(torch.from_numpy(pixels).permute(2, 0, 1), CFG)  # [3, 1, 256]
    assert got.dtype == torch.float32
    assert torch.equal(got, _bf16_reference(pixels))
    # the same by hand: each step's float32 result rounded to bfloat16
    scaled = _round_bf16(values.astype(np.float32) * np.float32(1 / 255))
    expected = _round_bf16(_round_bf16(scaled - np.float32(0.5)) / np.float32(0.5))
    assert np.array_equal(got[0, 0].numpy(), expected)
    # and it is not float32 arithmetic: bfloat16 keeps 8 significant bits
    plain = (values.astype(np.float32) / 255 - 0.5) / 0.5
    assert not np.array_equal(got[0, 0].numpy(), plain)
    assert got.min() == -1.0 and got.max() == 1.0


def _image(h: int, w: int, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels), pixels


def _global_tile(image: Image.Image) -> torch.Tensor:
    return _bf16_reference(np.asarray(image.resize((S, S), Image.Resampling.BILINEAR)))


def test_one_tile_without_resize_is_the_pixels_normalised() -> None:
    image, pixels = _image(S, S)
    out = preprocess(image, CFG)
    assert out.grid == (1, 1) and out.num_tiles == 1  # no global tile for one tile
    assert out.pixel_values.shape == (1, 3, S, S) and out.pixel_values.dtype == torch.float32
    assert torch.equal(out.pixel_values[0], _bf16_reference(pixels))


def test_wide_image_tiles_padding_and_global_tile() -> None:
    image, pixels = _image(200, 700, seed=1)  # plan: canvas (336, 1008), kept at 200 x 700
    out = preprocess(image, CFG)
    assert out.grid == (1, 3) and out.num_tiles == 4  # 3 tiles + the global one
    padded = np.zeros((S, 3 * S, 3), dtype=np.uint8)
    padded[:200, :700] = pixels
    full = _bf16_reference(padded)  # [3, 336, 1008]
    for x in range(3):
        assert torch.equal(out.pixel_values[x], full[:, :, x * S:(x + 1) * S]), x
    # the padding is the normalised 0: rows 200.. everywhere, columns 700.. (tile 2 from 28)
    assert bool((out.pixel_values[:3, :, 200:] == -1.0).all())
    assert bool((out.pixel_values[2, :, :, 700 - 2 * S:] == -1.0).all())
    assert torch.equal(out.pixel_values[3], _global_tile(image))
    assert out.pixel_values.min() >= -1.0 and out.pixel_values.max() <= 1.0


def test_tile_order_is_row_major() -> None:
    image, pixels = _image(2 * S, 2 * S, seed=2)  # fits (672, 672) at exactly 1.0: 2 x 2, no resize
    out = preprocess(image, CFG)
    assert out.grid == (2, 2) and out.num_tiles == 5
    full = _bf16_reference(pixels)
    for index, (y, x) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert torch.equal(out.pixel_values[index], full[:, y * S:(y + 1) * S, x * S:(x + 1) * S]), (y, x)
    assert torch.equal(out.pixel_values[4], _global_tile(image))


def test_tall_image_pads_right_and_bottom() -> None:
    image, pixels = _image(1000, 300, seed=3)  # canvas (1008, 336), kept at 1000 x 300
    out = preprocess(image, CFG)
    assert out.grid == (3, 1) and out.num_tiles == 4
    assert torch.equal(out.pixel_values[0], _bf16_reference(np.pad(pixels[:S], ((0, 0), (0, S - 300), (0, 0)))))
    assert bool((out.pixel_values[:3, :, :, 300:] == -1.0).all())
    assert bool((out.pixel_values[2, :, 1000 - 2 * S:] == -1.0).all())


def test_huge_image_is_downscaled_to_fill_its_canvas() -> None:
    y, x = np.mgrid[0:3000, 0:4000]
    pixels = np.stack([(y % 256), (x % 256), ((x + y) % 256)], axis=-1).astype(np.uint8)
    out = preprocess(Image.fromarray(pixels), CFG)  # canvas (1008, 1344), resized to fill it
    assert out.grid == (3, 4) and out.num_tiles == 13
    assert out.pixel_values.shape == (13, 3, S, S)
    assert out.pixel_values.min() >= -1.0 and out.pixel_values.max() <= 1.0


def test_tiny_image_is_upscaled_to_one_tile() -> None:
    image, _ = _image(5, 5, seed=4)
    out = preprocess(image, CFG)
    assert out.grid == (1, 1) and out.pixel_values.shape == (1, 3, S, S)
    expected = _bf16_reference(np.asarray(image.resize((S, S), Image.Resampling.BILINEAR)))
    assert torch.equal(out.pixel_values[0], expected)


def test_small_wide_image_is_upscaled_and_padded_below() -> None:
    image, _ = _image(100, 300, seed=5)  # (336, 336) canvas, resized to 112 x 336
    out = preprocess(image, CFG)
    assert out.grid == (1, 1)
    resized = np.asarray(image.resize((336, 112), Image.Resampling.BILINEAR))
    assert torch.equal(out.pixel_values[0, :, :112], _bf16_reference(resized))
    assert bool((out.pixel_values[0, :, 112:] == -1.0).all())


def _row(image: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(p) for p in np.asarray(image)[0].tolist()]


def test_to_rgb_composites_transparency_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))  # fully transparent -> white
    assert _row(to_rgb(rgba)) == [(10, 20, 30), (255, 255, 255)]
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))  # half transparent black -> grey
    assert _row(to_rgb(half)) == [(127, 127, 127)]
    assert _row(to_rgb(Image.new("LA", (1, 1), (0, 0)))) == [(255, 255, 255)]
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([200, 0, 0, 0, 200, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # palette entry 1 is transparent
    assert _row(to_rgb(palette)) == [(200, 0, 0), (255, 255, 255)]
    assert _row(to_rgb(Image.new("L", (1, 1), 7))) == [(7, 7, 7)]


def test_processed_image_checks_its_tile_count() -> None:
    with pytest.raises(ValueError, match="needs 5 tiles"):
        ProcessedImage(pixel_values=torch.zeros(4, 3, 2, 2), grid=(2, 2))
    assert ProcessedImage(pixel_values=torch.zeros(1, 3, 2, 2), grid=(1, 1)).num_tiles == 1


# ---------------------------------------------------------------------------------- config

def test_config_from_preprocessor_dict() -> None:
    scout = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Llama4ImageProcessorFast", "max_patches": 16,
        "processor_class": "Llama4Processor", "resample": 2, "rescale_factor": 0.00392156862745098,
        "resize_to_max_canvas": False, "size": {"height": 336, "width": 336}, "crop_size": None,
    }
    assert ImageProcessorConfig.from_dict(scout) == ImageProcessorConfig()
    cfg = ImageProcessorConfig.from_dict({"size": {"height": 448, "width": 448}, "max_patches": 4,
                                          "resize_to_max_canvas": True, "unknown": 1})
    assert (cfg.tile_size, cfg.max_patches, cfg.resize_to_max_canvas) == (448, 4, True)
    assert ImageProcessorConfig.from_vision(448).tile_size == 448
    with pytest.raises(ValueError, match="square"):
        ImageProcessorConfig.from_dict({"size": {"height": 336, "width": 448}})
    with pytest.raises(ValueError, match="do_resize"):
        ImageProcessorConfig.from_dict({"do_resize": False})
    with pytest.raises(ValueError, match="resample"):
        ImageProcessorConfig.from_dict({"resample": 3})
    with pytest.raises(ValueError, match="max_patches"):
        ImageProcessorConfig.from_dict({"max_patches": 0})


# ---------------------------------------------------------------------------------- tokens

TOKENS = ImageTokens(image_start=1, image_end=2, image=3, patch=4, tile_x_separator=5, tile_y_separator=6)
START, END, IMG, P, X, Y = 1, 2, 3, 4, 5, 6


def test_patches_per_tile() -> None:
    assert patches_per_tile(336, 14, 0.5) == 144  # (336 / 14)^2 = 576 patches, 2x2 -> 1
    assert patches_per_tile(448, 14, 0.5) == 256
    assert patches_per_tile(336, 14, 1.0) == 576


@pytest.mark.parametrize(("grid", "expected"), [
    ((1, 1), [START, IMG, P, P, END]),  # one tile: only the <|image|> part
    ((2, 2), [START, P, P, X, P, P, Y, P, P, X, P, P, Y, IMG, P, P, END]),
    ((1, 3), [START, P, P, X, P, P, X, P, P, Y, IMG, P, P, END]),
    ((3, 1), [START, P, P, Y, P, P, Y, P, P, Y, IMG, P, P, END]),
])
def test_prompt_layout(grid: tuple[int, int], expected: list[int]) -> None:
    assert image_prompt_ids(grid, 2, TOKENS) == expected


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (1, 3), (4, 4), (2, 5)])
def test_prompt_layout_matches_transformers(grid: tuple[int, int]) -> None:
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    text = Llama4Processor._prompt_split_image(None, grid, 3)  # type: ignore[arg-type]  # no self used
    names = {"<|image_start|>": START, "<|image_end|>": END, "<|image|>": IMG, "<|patch|>": P,
             "<|tile_x_separator|>": X, "<|tile_y_separator|>": Y}
    ids = [names[f"<|{piece}|>"] for piece in text[2:-2].split("|><|")]
    assert image_prompt_ids(grid, 3, TOKENS) == ids

"""Images in a request: the prompt's token layout, where the image embeddings go, and the keys
the prefix cache sees for them (`--enable-multimodal`).

A prompt carries one placeholder token (`<|image|>`) per image, in order (the chat template
writes one per `image_url` part; SGLang's `/generate` takes them in the text). `prepare` loads
and tiles each image (specdec/image_processor.py) and replaces its placeholder by Llama 4's
layout: `<|image_start|>`, the tiles' `<|patch|>` runs with their separators, `<|image|>` and
the global tile's patches, `<|image_end|>`. The `<|patch|>` positions take the vision tower's
embeddings instead of the token embedding (early fusion), in the target's forward and, as vLLM
and SGLang do for EAGLE3, in the draft's.

The embeddings are computed once per request, the first time a forward feeds one of its
patch positions, and kept with the request: a preempted request recomputes its KV but not its
images. For the prefix cache each image's patch positions are keyed by the image's digest (as
SGLang pads image tokens with a hash), so equal prompts with different images never share KV.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .image_processor import ImageProcessorConfig, ImageTokens, image_prompt_ids, preprocess
from .media import LoadedImage, MediaError, MediaLimits, load_image

IMAGE_TOKEN_NAMES = {
    "image_start": "<|image_start|>",
    "image_end": "<|image_end|>",
    "image": "<|image|>",
    "patch": "<|patch|>",
    "tile_x_separator": "<|tile_x_separator|>",
    "tile_y_separator": "<|tile_y_separator|>",
}


@dataclass(frozen=True)
class ImageItem:
    pixel_values: Tensor  # [tiles, 3, S, S] (the global tile last when there are several)
    grid: tuple[int, int]  # tiles down, across
    digest: str  # sha256 of the encoded image


@dataclass
class MultimodalInputs:
    """A request's images and where their embeddings go in its prompt."""

    items: tuple[ImageItem, ...]
    positions: Tensor  # [P] prompt positions of every <|patch|> token, ascending
    key_ids: list[int]  # the prompt as the prefix cache keys it (patches -> image keys)
    embeds: Tensor | None = field(default=None, repr=False)  # [P, H_text] once computed

    def ensure_embeds(self, tower: Any) -> Tensor:
        """The images' embeddings, all tiles of all images in prompt order (computed once)."""
        if self.embeds is None:
            pixels = torch.cat([it.pixel_values for it in self.items])  # [tiles, 3, S, S]
            self.embeds = tower.embed(pixels)
            if self.embeds.shape[0] != self.positions.shape[0]:
                raise RuntimeError(f"{self.embeds.shape[0]} image embeddings for {self.positions.shape[0]} "
                                   "<|patch|> positions")
        return self.embeds

    def rows(self, start: int, end: int) -> tuple[Tensor, Tensor] | None:
        """For the patch positions in [start, end): (their offsets from `start` [k], their
        embedding rows [k, H_text]); None when there are none. Needs `ensure_embeds` first."""
        lo = int(torch.searchsorted(self.positions, start))
        hi = int(torch.searchsorted(self.positions, end))
        if lo == hi:
            return None
        assert self.embeds is not None, "ensure_embeds() first"
        return self.positions[lo:hi] - start, self.embeds[lo:hi]

    def overlaps(self, start: int, end: int) -> bool:
        return bool(self.positions.numel()) and int(self.positions[0]) < end and int(self.positions[-1]) >= start


def merge_embeds(x: Tensor, spans: Sequence[tuple[int, MultimodalInputs, int, int]]) -> Tensor:
    """x [T, H] token embeddings of a batch; each span (first row, inputs, start, end) says that
    rows [first, first + end - start) hold positions [start, end) of a request: its patch
    positions there get the image rows. Returns x (changed in place)."""
    for row, mm, start, end in spans:
        hit = mm.rows(start, end)
        if hit is not None:
            offs, emb = hit
            x[offs.to(x.device) + row] = emb.to(device=x.device, dtype=x.dtype)
    return x


def _image_key(digest: str) -> int:
    """A prefix-cache key for an image's patch positions: negative, so never a token id."""
    return -1 - int(digest[:15], 16)


@dataclass(frozen=True)
class MultimodalProcessor:
    """Turns a prompt with placeholders and its images into the model's token layout."""

    tokens: ImageTokens
    tokens_per_tile: int
    image_config: ImageProcessorConfig
    limits: MediaLimits
    max_images: int  # --limit-mm-per-prompt image=N

    def load(self, image: str | LoadedImage) -> LoadedImage:
        return image if isinstance(image, LoadedImage) else load_image(image, self.limits)

    def prepare(self, ids: Sequence[int], images: Sequence[str | LoadedImage]) -> tuple[list[int], MultimodalInputs]:
        """(the prompt with each placeholder expanded, the request's multimodal inputs). Raises
        MediaError (a ValueError: a 400) for too many images, a placeholder count that does not
        match, or an image that cannot be read."""
        if len(images) > self.max_images:
            raise MediaError(f"{len(images)} images in one prompt; at most {self.max_images} "
                             "(--limit-mm-per-prompt image=N)")
        slots = [i for i, t in enumerate(ids) if t == self.tokens.image]
        if len(slots) != len(images):
            raise MediaError(f"the prompt has {len(slots)} image placeholder(s) (<|image|>) for {len(images)} "
                             "image(s); put one placeholder where each image goes")
        out: list[int] = []
        keys: list[int] = []
        positions: list[int] = []
        items: list[ImageItem] = []
        prev = 0
        for slot, image in zip(slots, images, strict=True):
            loaded = self.load(image)
            processed = preprocess(loaded.image, self.image_config)
            layout = image_prompt_ids(processed.grid, self.tokens_per_tile, self.tokens)
            out.extend(ids[prev:slot])
            keys.extend(ids[prev:slot])
            key = _image_key(loaded.digest)
            for t in layout:
                if t == self.tokens.patch:
                    positions.append(len(out))
                out.append(t)
                keys.append(key if t == self.tokens.patch else t)
            items.append(ImageItem(processed.pixel_values, processed.grid, loaded.digest))
            prev = slot + 1
        out.extend(ids[prev:])
        keys.extend(ids[prev:])
        return out, MultimodalInputs(tuple(items), torch.tensor(positions, dtype=torch.long), keys)


def image_tokens_from_tokenizer(tokenizer: Any, patch_id: int, boi_id: int, eoi_id: int) -> ImageTokens:
    """The layout tokens' ids from the tokenizer, checked against the config's <|patch|>,
    <|image_start|> and <|image_end|> ids."""
    found: dict[str, int] = {}
    for name, text in IMAGE_TOKEN_NAMES.items():
        tid = tokenizer.convert_tokens_to_ids(text)
        if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"--enable-multimodal: the tokenizer has no {text} token")
        found[name] = int(tid)
    for name, want in (("patch", patch_id), ("image_start", boi_id), ("image_end", eoi_id)):
        if found[name] != want:
            raise ValueError(f"--enable-multimodal: the tokenizer's {IMAGE_TOKEN_NAMES[name]} is {found[name]}, "
                             f"the config says {want}")
    return ImageTokens(**found)


def image_processor_config(model_path: Path, tile_size: int) -> ImageProcessorConfig:
    """The checkpoint's preprocessor_config.json if it has one, else Llama 4's defaults with
    the vision config's tile size."""
    f = model_path / "preprocessor_config.json"
    if not f.exists():
        return ImageProcessorConfig.from_vision(tile_size)
    cfg = ImageProcessorConfig.from_dict(json.loads(f.read_text()))
    if cfg.tile_size != tile_size:
        raise ValueError(f"{f}: size {cfg.tile_size} differs from the vision config's image_size {tile_size}")
    return cfg

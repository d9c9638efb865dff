"""Images through the engine against transformers' Llama4ForConditionalGeneration on tiny
random checkpoints: one tile, several tiles with the global tile, two images in one prompt;
the same pixels and token layout, greedy tokens equal and logprobs within TOL; with EAGLE3,
hybrid KV, chunked prefill, preemption and the prefix cache."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llama4.processing_llama4 import Llama4Processor

from specdec.media import MediaError

from .spec_models import make_random_eagle3
from .tiny_models import MM_IDS, Checkpoint, make_multimodal_checkpoint

TOL = 2e-3  # float32 logprobs; image rows go through a second model (the tower) first
IMAGE = MM_IDS["<|image|>"]
TEXT = [MM_IDS["<|begin_of_text|>"], 40, 41, 42]
SIZES = {"one_tile": (40, 50), "tiles": (100, 170), "tall": (180, 60)}  # (height, width)


def picture(hw: tuple[int, int], seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (*hw, 3), dtype=np.uint8))


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_multimodal_checkpoint(tmp_path_factory.mktemp("mm"), seed=3)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mm_head")
    make_random_eagle3(path, target_hidden=32, vocab=128, aux_layer_ids=(0, 1, 1))
    return path


def engine(ckpt: Checkpoint, **kw: Any) -> Any:
    return ckpt.engine(enable_multimodal=True, skip_tokenizer_init=False, **kw)


@pytest.fixture(scope="module")
def plain(ckpt: Checkpoint) -> Any:
    return engine(ckpt)


def hf_greedy(ckpt: Checkpoint, ids: list[int], pixels: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' generate, then one full forward for the logprobs of what it chose."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = ckpt.hf.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pixels,
                               max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        gen = out[0, len(ids):].tolist()
        full = torch.tensor([ids + gen])
        logits = ckpt.hf(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=pixels,
                         use_cache=False).logits[0].float()
    lp = logits.log_softmax(-1)[len(ids) - 1 : -1].gather(1, torch.tensor(gen)[:, None])[:, 0]
    return gen, lp


def check_against_hf(ckpt: Checkpoint, eng: Any, prompt: list[int], images: list[Image.Image], n: int = 12) -> dict:
    ids, mm = eng.prepare_images(prompt, [data_url(im) for im in images])
    assert mm is not None
    pixels = torch.cat([it.pixel_values for it in mm.items])
    want, want_lp = hf_greedy(ckpt, ids, pixels, n)
    out = eng.generate(input_ids=prompt, image_data=[data_url(im) for im in images],
                       sampling_params={"temperature": 0, "max_new_tokens": n, "ignore_eos": True},
                       return_logprob=True)
    assert out["output_ids"] == want
    lp = torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])
    assert float((lp - want_lp).abs().max()) < TOL
    assert out["meta_info"]["prompt_tokens"] == len(ids)
    return out


def test_the_layout_is_transformers_processor_s(ckpt: Checkpoint, plain: Any) -> None:
    """Our expanded prompt equals Llama4Processor's layout string, tokenised, per grid."""
    for name, hw in SIZES.items():
        ids, mm = plain.prepare_images([IMAGE], [data_url(picture(hw, 0))])
        (item,) = mm.items
        text = Llama4Processor._prompt_split_image(None, item.grid, 4)  # (uses no state)
        assert ids == plain.tokenizer.encode(text, add_special_tokens=False), name
        assert mm.positions.tolist() == [i for i, t in enumerate(ids) if t == MM_IDS["<|patch|>"]]
        tiles = item.grid[0] * item.grid[1]
        assert item.pixel_values.shape[0] == (tiles + 1 if tiles > 1 else 1)
    assert plain.prepare_images([IMAGE], [data_url(picture(SIZES["tiles"], 0))])[1].items[0].grid != (1, 1)


@pytest.mark.parametrize("case", ["one_tile", "tiles", "tall"])
def test_one_image_matches_transformers(ckpt: Checkpoint, plain: Any, case: str) -> None:
    check_against_hf(ckpt, plain, [*TEXT, IMAGE, 43, 44], [picture(SIZES[case], 1)])


def test_two_images_in_one_prompt_match_transformers(ckpt: Checkpoint, plain: Any) -> None:
    check_against_hf(ckpt, plain, [*TEXT, IMAGE, 45, IMAGE, 46],
                     [picture(SIZES["tiles"], 2), picture(SIZES["one_tile"], 3)])


@pytest.mark.parametrize("kw", [{"chunked_prefill_size": 16}, {"page_size": 4, "max_total_tokens": 256}])
def test_chunked_prefill_cutting_images_matches_transformers(ckpt: Checkpoint, kw: dict[str, Any]) -> None:
    check_against_hf(ckpt, engine(ckpt, **kw), [*TEXT, IMAGE, 47], [picture(SIZES["tiles"], 4)])


def test_eagle3_with_images_is_lossless(ckpt: Checkpoint, head: Path) -> None:
    spec = engine(ckpt, speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head),
                  speculative_num_steps=3, speculative_eagle_topk=2, speculative_num_draft_tokens=5,
                  chunked_prefill_size=16)
    out = check_against_hf(ckpt, spec, [*TEXT, IMAGE, 48, IMAGE], [picture(SIZES["tiles"], 5),
                                                                    picture(SIZES["tall"], 6)], n=16)
    assert out["meta_info"]["spec_verify_ct"] > 0


def test_the_draft_sees_the_image_rows(ckpt: Checkpoint, head: Path) -> None:
    """The draft's inputs at patch positions are the image embeddings (not <|patch|>'s own)."""
    spec = engine(ckpt, speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head),
                  speculative_num_steps=2, speculative_eagle_topk=1, speculative_num_draft_tokens=3,
                  speculative_adaptive="off")
    seen: list[torch.Tensor | None] = []
    draft = spec.draft_model
    original = draft.forward

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append(args[4] if len(args) > 4 else kw.get("input_embeds"))
        return original(*args, **kw)

    draft.forward = spy  # type: ignore[method-assign]
    prompt = [*TEXT, IMAGE, 49]
    _ids, mm = spec.prepare_images(prompt, [data_url(picture(SIZES["one_tile"], 7))])
    spec.generate(input_ids=prompt, image_data=[data_url(picture(SIZES["one_tile"], 7))],
                  sampling_params={"temperature": 0, "max_new_tokens": 4})
    first = seen[0]
    assert first is not None  # the prompt's extend
    rows = [p - 1 for p in mm.positions.tolist()]  # draft row r pairs h_r with token r + 1
    emb = spec.vision.embed(torch.cat([it.pixel_values for it in mm.items]))
    torch.testing.assert_close(first[rows], emb, atol=1e-6, rtol=0)


def test_hybrid_kv_with_images_matches_transformers(tmp_path: Path) -> None:
    hybrid = make_multimodal_checkpoint(tmp_path, seed=4, num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0],
                                        attention_chunk_size=16)
    eng = engine(hybrid, chunked_prefill_size=16, swa_full_tokens_ratio=0.5)
    assert eng.hybrid_kv
    check_against_hf(hybrid, eng, [*TEXT, IMAGE, 50, 51], [picture(SIZES["tiles"], 8)])


def test_preempted_requests_keep_their_images(ckpt: Checkpoint) -> None:
    """A KV cache too small for all three makes the scheduler preempt; outputs stay transformers'."""
    eng = engine(ckpt, page_size=4, max_total_tokens=160, disable_radix_cache=True)
    images = [picture(SIZES["tiles"], 9), picture(SIZES["tall"], 10), picture(SIZES["one_tile"], 11)]
    prompts = [[*TEXT, IMAGE, 52 + i] for i in range(3)]
    outs = eng.generate(input_ids=prompts, image_data=[data_url(im) for im in images],
                        sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})
    assert eng.metrics.preemptions > 0
    assert eng.allocator.num_free_pages == eng.allocator.num_pages
    for prompt, im, out in zip(prompts, images, outs, strict=True):
        ids, mm = eng.prepare_images(prompt, [data_url(im)])
        want, _ = hf_greedy(ckpt, ids, torch.cat([it.pixel_values for it in mm.items]), 24)
        assert out["output_ids"] == want


def test_the_prefix_cache_keys_images_by_content(ckpt: Checkpoint) -> None:
    eng = engine(ckpt)
    prompt = TEXT * 4 + [IMAGE, 53, 54]
    a, b = picture(SIZES["tiles"], 12), picture(SIZES["tiles"], 13)
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    first = eng.generate(input_ids=prompt, image_data=[data_url(a)], sampling_params=params)
    same = eng.generate(input_ids=prompt, image_data=[data_url(a)], sampling_params=params)
    other = eng.generate(input_ids=prompt, image_data=[data_url(b)], sampling_params=params)
    assert same["meta_info"]["cached_tokens"] > 16 and same["output_ids"] == first["output_ids"]
    # the other image shares only the text before it (whole pages of 16)
    assert other["meta_info"]["cached_tokens"] == 16
    ids, mm = eng.prepare_images(prompt, [data_url(b)])
    want, _ = hf_greedy(ckpt, ids, torch.cat([it.pixel_values for it in mm.items]), 4)
    assert other["output_ids"] == want


def test_bad_image_requests_are_refused(ckpt: Checkpoint, plain: Any, tmp_path: Path) -> None:
    url = data_url(picture(SIZES["one_tile"], 0))
    with pytest.raises(MediaError, match="placeholder"):
        plain.generate(input_ids=TEXT, image_data=[url])
    with pytest.raises(MediaError, match="placeholder"):
        plain.generate(input_ids=[*TEXT, IMAGE, IMAGE], image_data=[url])
    with pytest.raises(MediaError, match="at most 2"):
        engine(ckpt, limit_mm_per_prompt="image=2").generate(input_ids=TEXT + [IMAGE] * 3, image_data=[url] * 3)
    with pytest.raises(MediaError, match="base64"):
        plain.generate(input_ids=[*TEXT, IMAGE], image_data=["data:image/png;base64,@@@"])
    with pytest.raises(ValueError, match="--enable-multimodal"):
        ckpt.engine().generate(input_ids=[*TEXT, IMAGE], image_data=[url])
    assert plain.allocator.num_free_pages == plain.allocator.num_pages  # nothing was admitted


def test_bfloat16_weights_stay_close_to_transformers(ckpt: Checkpoint) -> None:
    """A bf16 engine (tower included) on the same checkpoint: its prompt logprobs within a bf16
    tolerance of transformers' float32 ones, image positions included."""
    eng = engine(ckpt, dtype="bfloat16")
    assert eng.vision.vision_model.cis.dtype == torch.complex64  # (not cast with the weights)
    prompt = [*TEXT, IMAGE, 55]
    url = data_url(picture(SIZES["tiles"], 14))
    ids, mm = eng.prepare_images(prompt, [url])
    out = eng.generate(input_ids=prompt, image_data=[url], return_logprob=True, logprob_start_len=0,
                       sampling_params={"temperature": 0, "max_new_tokens": 1})
    lp = torch.tensor([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]])
    with torch.no_grad():
        ref = ckpt.hf(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      pixel_values=torch.cat([it.pixel_values for it in mm.items]), use_cache=False).logits[0]
    ref_lp = ref.float().log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lp.shape == ref_lp.shape and float((lp - ref_lp).abs().max()) < 0.1

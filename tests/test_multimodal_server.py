"""Images through the HTTP server: OpenAI image_url chat parts (several per message, several
messages), SGLang's /generate with image_data, local files under --allowed-local-media-path,
every bad-image case a 400 naming the problem with the server still serving, and image and
text chats interleaved at concurrency 8 with EAGLE3 on. A tiny random Llama 4 with a
character tokenizer (tests/tiny_models.py), so the texts are noise but exactly comparable."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import specdec
from specdec.server.chat_template import load_chat_template

from .live_server import live_server
from .spec_models import make_random_eagle3
from .test_multimodal import SIZES, data_url, picture
from .tiny_models import Checkpoint, make_multimodal_checkpoint

pytestmark = pytest.mark.slow
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Checkpoint, Path, Path]:
    root = tmp_path_factory.mktemp("mm_server")
    ckpt = make_multimodal_checkpoint(root / "model", seed=5)
    head = root / "head"
    make_random_eagle3(head, target_hidden=32, vocab=128, aux_layer_ids=(0, 1, 1))
    media = root / "media"
    media.mkdir()
    picture(SIZES["tiles"], 21).save(media / "local.png")
    picture(SIZES["one_tile"], 22).save(root / "outside.png")
    return ckpt, head, media


@pytest.fixture(scope="module")
def server(model: tuple[Checkpoint, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ckpt, head, media = model
    args = ["--model-path", str(ckpt.path), "--dtype", "float32", "--enable-multimodal", "--chat-template", "llama-4",
            "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(head),
            "--speculative-num-steps", "3", "--speculative-eagle-topk", "2", "--speculative-num-draft-tokens", "5",
            "--allowed-local-media-path", str(media), "--limit-mm-per-prompt", "image=3",
            "--max-total-tokens", "2048", "--log-level", "warning"]
    with live_server(args, tmp_path_factory.mktemp("mm_log") / "server.log") as base:
        yield base


@pytest.fixture(scope="module")
def offline(model: tuple[Checkpoint, Path, Path]) -> Any:
    ckpt, _, media = model
    return specdec.Engine(model_path=str(ckpt.path), dtype="float32", enable_multimodal=True,
                          allowed_local_media_path=str(media), max_total_tokens=2048, log_level="warning")


def chat(server: str, content: Any, **extra: Any) -> httpx.Response:
    messages = content if isinstance(content, list) and content and "role" in content[0] else [
        {"role": "user", "content": content}]
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def offline_answer(offline: Any, prompt: str, images: list[str]) -> list[int]:
    out = offline.generate(input_ids=offline.encode(prompt), image_data=images,
                           sampling_params={"temperature": 0, "max_new_tokens": MAX_TOKENS})
    return out["output_ids"]


def rendered(offline: Any, messages: list[dict[str, Any]]) -> str:
    return load_chat_template("llama-4", offline.model_path).render(messages, add_generation_prompt=True)


def test_image_parts_in_several_messages_equal_the_offline_engine(server: str, offline: Any) -> None:
    a, b, c = (data_url(picture(SIZES[k], 30 + i)) for i, k in enumerate(("tiles", "one_tile", "tall")))
    messages = [
        {"role": "user", "content": [image_part(a), {"type": "text", "text": "Look."}, image_part(b)]},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "this?"},
                                     image_part(c)]},
    ]
    r = chat(server, messages, logprobs=True)
    assert r.status_code == 200, r.text
    body = r.json()
    # the template got each image's placeholder where its part stood (text parts joined by \n)
    prompt = rendered(offline, [
        {"role": "user", "content": "<|image|>Look.<|image|>"}, {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "And\nthis?<|image|>"}])
    want = offline_answer(offline, prompt, [a, b, c])
    assert len(body["choices"][0]["logprobs"]["content"]) == len(want)
    assert body["choices"][0]["message"]["content"] == offline.detokenize(want, True)
    ids, _ = offline.prepare_images(offline.encode(prompt), [a, b, c])
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_native_generate_with_image_data(server: str, offline: Any, model: tuple[Checkpoint, Path, Path]) -> None:
    _, _, media = model
    local = str(media / "local.png")
    text = "<|begin_of_text|>Describe <|image|> and <|image|>:"
    url = data_url(picture(SIZES["tall"], 40))
    r = httpx.post(f"{server}/generate", json={"text": text, "image_data": [url, "file://" + local],
                                               "sampling_params": {"temperature": 0, "max_new_tokens": MAX_TOKENS}},
                   timeout=120)
    assert r.status_code == 200, r.text
    want = offline.generate(prompt=text, image_data=[url, local],
                            sampling_params={"temperature": 0, "max_new_tokens": MAX_TOKENS})
    assert r.json()["output_ids"] == want["output_ids"]
    # a batch: one entry per prompt (an image, or none)
    r = httpx.post(f"{server}/generate", json={"text": [text.replace(" and <|image|>", ""), "<|begin_of_text|>Hi"],
                                               "image_data": [url, None],
                                               "sampling_params": {"temperature": 0, "max_new_tokens": 4}},
                   timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()) == 2


def test_a_second_turn_with_the_same_image_is_cached(server: str) -> None:
    url = data_url(picture(SIZES["tiles"], 41))
    first = [{"role": "user", "content": [image_part(url), {"type": "text", "text": "What is it?"}]}]
    r1 = chat(server, first)
    assert r1.status_code == 200, r1.text
    second = [*first, {"role": "assistant", "content": r1.json()["choices"][0]["message"]["content"]}, {"role": "user", "content": "Sure?"}]
    r2 = chat(server, second)
    assert r2.status_code == 200, r2.text
    cached = r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= r1.json()["usage"]["prompt_tokens"] - 16  # all but the last partial page


BAD = [
    ("data:image/png;base64,!!notbase64", "base64"),
    ("data:text/plain;base64,aGVsbG8=", "image"),
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", "decode"),
    ("http://127.0.0.1:9/picture.png", "fetch"),
    ("ftp://example.com/a.png", "scheme"),
]


@pytest.mark.parametrize("url,match", BAD)
def test_bad_images_get_a_400_naming_the_problem(server: str, url: str, match: str) -> None:
    r = chat(server, [image_part(url)])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert match in error["message"].lower() and error["param"] == "messages"
    assert chat(server, "still there?").status_code == 200


def test_local_files_outside_the_allowed_folder_and_too_many_images(server: str,
                                                                     model: tuple[Checkpoint, Path, Path]) -> None:
    _, _, media = model
    r = chat(server, [image_part("file://" + str(media.parent / "outside.png"))])
    assert r.status_code == 400 and "allowed" in r.json()["error"]["message"]
    r = chat(server, [image_part("file://" + str(media / "local.png"))])
    assert r.status_code == 200, r.text
    url = data_url(picture(SIZES["one_tile"], 42))
    r = chat(server, [image_part(url)] * 4)
    assert r.status_code == 400 and "at most 3" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/generate", json={"text": "<|image|>", "image_data": [url, url]}, timeout=60)
    assert r.status_code == 400 and "placeholder" in r.json()["error"]["message"]
    r = chat(server, [{"type": "image_url"}])
    assert r.status_code == 400


def test_image_and_text_chats_at_concurrency_8_all_succeed(server: str) -> None:
    def run(k: int) -> dict[str, Any]:
        content: Any = (f"Text chat {k}." if k % 2 else
                        [image_part(data_url(picture(SIZES[("tiles", "tall", "one_tile")[k % 3]], 50 + k))),
                         {"type": "text", "text": f"Image chat {k}."}])
        r = chat(server, content, max_tokens=16)
        assert r.status_code == 200, r.text
        return r.json()

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(16)))
    assert all(r["choices"][0]["finish_reason"] in ("stop", "length") for r in results)
    metrics = httpx.get(f"{server}/metrics", timeout=10).text
    assert "sglang:spec_accept_length" in metrics
    info = httpx.get(f"{server}/get_server_info", timeout=10).json()
    assert info["metrics"]["kv_used_tokens"] == 0  # every request's KV came back


def test_image_parts_render_as_placeholders_where_they_stand() -> None:
    from specdec.server.openai_api import ApiError, _content_text
    from specdec.server.protocol import ContentPart, ImageUrl

    parts = [ContentPart("text", "a"), ContentPart("image_url", image_url=ImageUrl("u1")), ContentPart("text", "b"),
             ContentPart("text", "c"), ContentPart("image_url", image_url=ImageUrl("u2"))]
    images: list[str] = []
    assert _content_text(parts, 0, images, "<|image|>") == "a<|image|>b\nc<|image|>"
    assert images == ["u1", "u2"]
    with pytest.raises(ApiError, match="--enable-multimodal"):
        _content_text(parts, 0, [], None)
    with pytest.raises(ApiError, match="without image_url"):
        _content_text([ContentPart("image_url")], 0, [], "<|image|>")
    with pytest.raises(ApiError, match="text or image_url"):
        _content_text([ContentPart("input_audio")], 0, [], "<|image|>")

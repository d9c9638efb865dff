"""The bundled SmolLM2-135M-Instruct, fp32: our greedy continuations equal transformers'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import specdec
from specdec.target.embedded import ensure_embedded_model

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 64
CHATS = [
    "Write a short story about a robot who learns to paint.",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Describe the water cycle step by step.",
    "Hello! What is 2 + 2?",  # answers briefly: exercises stopping at EOS
]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_embedded_model()


@pytest.fixture(scope="module")
def prompts(model_path: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    return [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
        for text in CHATS
    ]


@pytest.fixture(scope="module")
def hf_continuations(model_path: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuations, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=MAX_NEW_TOKENS,
            )
            outs.append(out[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Any:
    return specdec.Engine(model_path=None, dtype="float32", max_total_tokens=2048,
                          log_level="warning")


def test_engine_uses_the_bundled_model(engine: Any, model_path: Path) -> None:
    assert Path(engine.model_path) == model_path
    assert engine.model_config.architecture == "LlamaForCausalLM"
    assert 2 in engine.eos_token_ids  # <|im_end|>


def test_greedy_continuations_equal_transformers(
    engine: Any, prompts: list[list[int]], hf_continuations: list[list[int]]
) -> None:
    outs = engine.generate(
        input_ids=prompts,
        sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS},
    )
    eos = set(engine.eos_token_ids)
    lengths = [len(r) for r in hf_continuations]
    assert MAX_NEW_TOKENS in lengths and min(lengths) < MAX_NEW_TOKENS  # both endings covered
    for text, out, ref in zip(CHATS, outs, hf_continuations, strict=True):
        ours = out["output_ids"]
        # both stop at the first EOS (kept in the output) or after MAX_NEW_TOKENS
        stop = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
        assert ref[:stop] == ref and len(ref) <= MAX_NEW_TOKENS
        assert ours == ref, f"{text!r}: first difference at token " + str(
            next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        )
        reason = out["meta_info"]["finish_reason"]
        if len(ref) < MAX_NEW_TOKENS:
            assert reason["type"] == "stop", reason
        else:
            assert reason["type"] in ("length", "stop"), reason


def test_text_prompt_matches_chat_ids(engine: Any, prompts: list[list[int]],
                                      hf_continuations: list[list[int]]) -> None:
    """The engine's own tokenizer path gives the same continuation as the chat ids."""
    tok = engine.tokenizer
    text = tok.decode(prompts[0])
    out = engine.generate(prompt=text, sampling_params={"temperature": 0, "max_new_tokens": 16})
    assert out["output_ids"] == hf_continuations[0][:16]

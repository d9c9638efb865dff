"""generation_config.json sampling defaults, vLLM's --generation-config and
--override-generation-config (specdec/generation_config.py).

The loader and merger on temporary folders; the defaults applied to requests that leave a
parameter out (offline Engine, /generate's sampling dict, the OpenAI request builder) with the
embedded model; attn_temperature_tuning from the override on a tiny random Llama 4 checkpoint,
against transformers with the flag on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import specdec
from specdec.cli_args import add_engine_args, engine_kwargs
from specdec.engine_config import EngineConfig
from specdec.generation_config import GenerationDefaults, load_generation_defaults, parse_override
from specdec.sampling_params import SamplingParams
from specdec.server.openai_api import sampling_params as openai_sampling_params
from specdec.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from specdec.target.loader import load_model

from .tiny_models import compare_with_hf, make_checkpoint, random_prompts


def _folder(tmp_path: Path, name: str, content: Any) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "generation_config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return d


# ---- loader and merger ------------------------------------------------------------------------


def test_missing_file_gives_no_defaults(tmp_path: Path) -> None:
    d = load_generation_defaults("auto", None, tmp_path)
    assert d.sampling == {} and d.attn_temperature_tuning is None
    assert "none" in d.describe()


def test_file_sampling_keys_become_defaults(tmp_path: Path) -> None:
    model = _folder(tmp_path, "model", {
        "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
        "max_new_tokens": 64, "do_sample": True, "eos_token_id": [1, 2], "bos_token_id": 0,
        "transformers_version": "4.51.0",
    })
    d = load_generation_defaults("auto", None, model)
    assert d.sampling == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                          "repetition_penalty": 1.1, "max_new_tokens": 64}
    assert str(model / "generation_config.json") in d.describe()
    # vllm: the file is ignored; a folder path: that folder's file
    assert load_generation_defaults("vllm", None, model).sampling == {}
    other = _folder(tmp_path, "other", {"temperature": 0.3})
    assert load_generation_defaults(str(other), None, model).sampling == {"temperature": 0.3}
    with pytest.raises(ValueError, match=r"no generation_config\.json"):
        load_generation_defaults(str(tmp_path), None, model)


def test_override_wins_and_null_drops(tmp_path: Path) -> None:
    model = _folder(tmp_path, "model", {"temperature": 0.6, "top_p": 0.9})
    d = load_generation_defaults("auto", '{"temperature": 0, "top_k": 5, "top_p": null}', model)
    assert d.sampling == {"temperature": 0, "top_k": 5}
    assert "--override-generation-config" in d.source
    # vllm + override: only the override (vLLM's documented behaviour)
    assert load_generation_defaults("vllm", {"min_p": 0.1}, model).sampling == {"min_p": 0.1}
    d = load_generation_defaults("auto", '{"attn_temperature_tuning": true}', model)
    assert d.attn_temperature_tuning is True and "attn_temperature_tuning" not in d.sampling
    assert d.as_dict()["attn_temperature_tuning"] is True


@pytest.mark.parametrize(("override", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"temprature": 0.5}', "temprature"),
    ('{"max_tokens": 5}', "max_tokens"),
    ('{"temperature": "hot"}', "temperature must be a finite number"),
    ('{"top_k": 2.5}', "top_k must be an integer"),
    ('{"attn_temperature_tuning": 1}', "attn_temperature_tuning must be true or false"),
    ('{"top_p": 1.5}', "top_p"),
    ('{"temperature": -1}', "temperature"),
    ('{"max_new_tokens": 0}', "max_new_tokens"),
])
def test_bad_override_names_the_problem(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_generation_defaults("vllm", override, tmp_path)


@pytest.mark.parametrize(("content", "message"), [
    ("{oops", "not valid JSON"),
    ("[]", "must hold a JSON object"),
    ('{"top_k": "many"}', "top_k must be an integer"),
    ('{"temperature": -0.5}', "temperature must be >= 0"),
])
def test_bad_file_names_the_file_and_key(tmp_path: Path, content: str, message: str) -> None:
    model = _folder(tmp_path, "model", content)
    with pytest.raises(ValueError, match=message) as e:
        load_generation_defaults("auto", None, model)
    assert "generation_config.json" in str(e.value)


def test_engine_config_validates_the_flags(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="temprature"):
        EngineConfig(override_generation_config='{"temprature": 0}')
    with pytest.raises(ValueError, match="not a folder"):
        EngineConfig(generation_config=str(tmp_path / "missing"))
    assert EngineConfig(generation_config="vllm", override_generation_config={"top_k": 3}).generation_config == "vllm"


def test_cli_flags_reach_the_engine_config() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for flag in ("--generation-config", "--override-generation-config"):
        assert parser._option_string_actions[flag].help  # documented in --help
    kw = engine_kwargs(parser.parse_args(["--generation-config", "vllm",
                                          "--override-generation-config", '{"temperature": 0}']))
    assert kw["generation_config"] == "vllm" and kw["override_generation_config"] == '{"temperature": 0}'
    assert EngineConfig(**kw).override_generation_config == '{"temperature": 0}'


def test_from_dict_defaults_lose_to_explicit_values() -> None:
    defaults = {"temperature": 0.0, "top_k": 5}
    assert SamplingParams.from_dict(None, defaults).temperature == 0.0
    assert SamplingParams.from_dict({"temperature": None}, defaults).temperature == 0.0  # null = default
    p = SamplingParams.from_dict({"temperature": 0.8}, defaults)
    assert (p.temperature, p.top_k) == (0.8, 5)
    assert parse_override("") == {} and GenerationDefaults().sampling == {}


# ---- the defaults applied to requests (embedded SmolLM2-135M) ---------------------------------


@pytest.fixture(scope="module")
def greedy_engine() -> Any:
    """temperature 0 and max_new_tokens 6 from the override (the embedded model's own
    generation_config.json sets no sampling keys)."""
    with specdec.Engine(dtype="float32", max_total_tokens=1024, log_level="warning",
                        disable_radix_cache=True,
                        override_generation_config='{"temperature": 0, "max_new_tokens": 6, "top_k": 40}') as e:
        yield e


def test_unspecified_request_takes_the_default(greedy_engine: Any) -> None:
    prompt = "The capital of France is"
    plain = greedy_engine.generate(prompt=prompt, sampling_params={})
    explicit = greedy_engine.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": 6})
    nulls = greedy_engine.generate(prompt=prompt, sampling_params={"temperature": None, "seed": 1})
    assert plain["meta_info"]["completion_tokens"] == 6  # the default max_new_tokens
    assert plain["output_ids"] == explicit["output_ids"] == nulls["output_ids"]
    # an explicit request value wins: temperature 1 samples (some seed leaves the greedy path)
    sampled = [greedy_engine.generate(prompt=prompt, sampling_params={"temperature": 1.0, "seed": s,
                                                                      "max_new_tokens": 6})["output_ids"]
               for s in range(4)]
    assert any(ids != plain["output_ids"] for ids in sampled)
    p = greedy_engine.sampling_params({"temperature": 0.7, "top_k": -1})  # /generate's builder
    assert (p.temperature, p.top_k, p.max_new_tokens) == (0.7, -1, 6)


def test_openai_requests_take_the_defaults(greedy_engine: Any) -> None:
    state: Any = SimpleNamespace(engine=greedy_engine)
    chat = ChatCompletionRequest(messages=[ChatMessage(role="user", content="hi")])
    p = openai_sampling_params(state, chat, chat.max_tokens, 10)
    assert (p.temperature, p.top_k, p.max_new_tokens) == (0.0, 40, 6)  # max_tokens omitted: the default
    chat = ChatCompletionRequest(messages=[ChatMessage(role="user", content="hi")], temperature=0.5,
                                 top_k=3, max_tokens=20)
    p = openai_sampling_params(state, chat, chat.max_tokens, 10)
    assert (p.temperature, p.top_k, p.max_new_tokens) == (0.5, 3, 20)  # explicit values win
    # completions: max_tokens defaults to 16 (OpenAI's, as in vLLM), null takes the model default
    comp = CompletionRequest(prompt="hi")
    assert openai_sampling_params(state, comp, comp.max_tokens, 3).max_new_tokens == 16
    comp = CompletionRequest(prompt="hi", max_tokens=None)
    p = openai_sampling_params(state, comp, comp.max_tokens, 3)
    assert (p.max_new_tokens, p.temperature) == (6, 0.0)


# ---- attn_temperature_tuning from the override (tiny Llama 4) ---------------------------------

NOPE: dict[str, Any] = {
    "num_hidden_layers": 4,
    "no_rope_layers": None,
    "no_rope_layer_interval": 2,  # NoPE on layers 1, 3
    "floor_scale": 2,  # the scale changes every 2 positions: prompts of 20 see many
    "attn_scale": 0.5,
}


def test_override_turns_on_attn_temperature_tuning(tmp_path: Path) -> None:
    off = make_checkpoint(tmp_path / "off", "llama4", seed=3, attn_temperature_tuning=False, **NOPE)
    on = make_checkpoint(tmp_path / "on", "llama4", seed=3, attn_temperature_tuning=True, **NOPE)
    model, cfg = load_model(off.path, "float32", attn_temperature_tuning=True)
    assert cfg.attn_temperature_tuning and cfg.rope_layers == (True, False, True, False)
    assert [layer.attn.temperature_tuning for layer in model.layers] == [False, True, False, True]
    assert not load_model(off.path, "float32")[1].attn_temperature_tuning

    prompts = random_prompts((20, 13), seed=5)
    tuned = off.engine(override_generation_config={"attn_temperature_tuning": True})
    assert tuned.model_config.attn_temperature_tuning
    assert tuned.generation_defaults.as_dict() == {"attn_temperature_tuning": True}
    compare_with_hf(tuned, on.hf, prompts, 4, 1e-4)  # equals transformers with the flag on
    plain = off.engine()
    assert not plain.model_config.attn_temperature_tuning
    compare_with_hf(plain, off.hf, prompts, 4, 1e-4)

    def input_logprobs(engine: Any) -> list[float]:
        out = engine.generate(input_ids=prompts[0], sampling_params={"temperature": 0, "max_new_tokens": 1},
                              return_logprob=True, logprob_start_len=0)
        return [e[0] for e in out["meta_info"]["input_token_logprobs"][1:]]

    a, b = input_logprobs(tuned), input_logprobs(plain)
    assert abs(a[0] - b[0]) < 1e-5  # position 0 and 1: scale 1 either way
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-3  # later positions: NoPE layers scaled


# ---- a live server ------------------------------------------------------------------------------


def test_server_applies_the_defaults(tmp_path: Path) -> None:
    import httpx

    from .live_server import live_server

    override = '{"temperature": 0, "max_new_tokens": 5}'
    args = ["--dtype", "float32", "--speculative-algorithm", "NONE", "--max-total-tokens", "1024",
            "--log-level", "info", "--override-generation-config", override]
    log = tmp_path / "server.log"
    with live_server(args, log) as base:
        info = httpx.get(f"{base}/get_server_info").json()
        assert info["generation_defaults"] == {"temperature": 0, "max_new_tokens": 5}
        assert info["override_generation_config"] == override
        msgs = [{"role": "user", "content": "Name a colour."}]
        plain = httpx.post(f"{base}/v1/chat/completions", json={"messages": msgs}, timeout=60).json()
        greedy = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                            json={"messages": msgs, "temperature": 0, "max_tokens": 5}).json()
        assert plain["usage"]["completion_tokens"] == 5
        assert plain["choices"][0]["message"] == greedy["choices"][0]["message"]
        native = httpx.post(f"{base}/generate", json={"text": "Hello", "sampling_params": {}}, timeout=60).json()
        assert native["meta_info"]["completion_tokens"] == 5
    assert "default sampling parameters: temperature=0, max_new_tokens=5" in log.read_text()

"""Speculative settings, the EAGLE3 format and conventions, the n-gram proposer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specdec.draft.eagle3_config import Eagle3Config
from specdec.draft.loader import load_eagle3
from specdec.draft.ngram import ngram_tree
from specdec.spec_config import SpecConfig
from specdec.target.config import ConfigError
from specdec.target.loader import LoadError, load_model

from .spec_models import make_random_eagle3
from .tiny_models import VOCAB, Checkpoint, make_checkpoint

# ---- SpecConfig ----------------------------------------------------------------------------------


def test_defaults_are_sglangs_for_llama() -> None:
    spec = SpecConfig.from_options("eagle3", adaptive="off")
    assert spec is not None
    assert (spec.algorithm, spec.num_steps, spec.topk, spec.num_draft_tokens) == ("EAGLE3", 5, 4, 8)
    assert spec.lossless and not spec.adaptive


def test_adaptive_is_on_without_tree_flags_and_explicit_flags_fix_the_tree() -> None:
    from specdec.spec_config import ADAPTIVE_ENVELOPE

    auto = SpecConfig.from_options("EAGLE3")
    assert auto is not None and auto.adaptive
    assert (auto.num_steps, auto.topk, auto.num_draft_tokens) == ADAPTIVE_ENVELOPE
    fixed = SpecConfig.from_options("EAGLE3", num_steps=3, topk=1)
    assert fixed is not None and not fixed.adaptive
    bounded = SpecConfig.from_options("EAGLE3", num_steps=3, topk=2, num_draft_tokens=6, adaptive="on")
    assert bounded is not None and bounded.adaptive and bounded.envelope.label == "3,2,6"
    ngram = SpecConfig.from_options("NGRAM")
    assert ngram is not None and not ngram.adaptive  # n-gram trees follow the matches
    with pytest.raises(ValueError, match="needs a draft model"):
        SpecConfig.from_options("NGRAM", adaptive="on")
    with pytest.raises(ValueError, match="speculative_adaptive must be one of"):
        SpecConfig.from_options("EAGLE3", adaptive="sometimes")


def test_off_without_algorithm_and_refuses_orphan_settings() -> None:
    assert SpecConfig.from_options(None) is None
    with pytest.raises(ValueError, match="without --speculative-algorithm"):
        SpecConfig.from_options(None, num_steps=3)


def test_topk_one_is_a_chain() -> None:
    spec = SpecConfig.from_options("EAGLE3", num_steps=3, topk=1)
    assert spec is not None and spec.num_draft_tokens == 4
    with pytest.raises(ValueError, match="chain"):
        SpecConfig.from_options("EAGLE3", num_steps=3, topk=1, num_draft_tokens=6)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_steps": 2, "topk": 2, "num_draft_tokens": 8}, "exceeds"),  # at most 1 + 2 + 4 = 7
        ({"num_draft_tokens": 1}, ">= 2"),
        ({"num_steps": 0}, "positive"),
        ({"accept_threshold_single": 1.5}, r"\(0, 1\]"),
    ],
)
def test_inconsistent_settings_are_refused(kw: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpecConfig.from_options("EAGLE3", **kw)  # type: ignore[arg-type]


def test_unknown_algorithm_and_token_map_warning() -> None:
    with pytest.raises(ValueError, match="unknown speculative algorithm"):
        SpecConfig.from_options("MEDUSA")
    with pytest.warns(UserWarning, match="ignored"):
        SpecConfig.from_options("EAGLE3", token_map="/tmp/map.pt")


# ---- EAGLE3 conventions -----------------------------------------------------------------------------


def _cfg(**extra: object) -> dict[str, object]:
    return {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 32, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 40, "vocab_size": 128, "draft_vocab_size": 64,
            **extra}


def test_aux_layers_default_to_sglangs_choice() -> None:
    # SGLang captures the *inputs* of layers [2, L // 2, L - 3] when the head names none
    assert Eagle3Config.from_hf_dict(_cfg()).capture_layers(32) == (2, 16, 29)
    assert Eagle3Config.from_hf_dict(_cfg()).capture_layers(30) == (2, 15, 27)


def test_aux_layer_ids_name_layer_outputs() -> None:
    # eagle_aux_hidden_state_layer_ids i = output of layer i = input of layer i + 1 (SGLang adds 1)
    cfg = _cfg(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 23, 44]})
    assert Eagle3Config.from_hf_dict(cfg).capture_layers(48) == (2, 24, 45)
    with pytest.raises(ConfigError, match="outside"):
        Eagle3Config.from_hf_dict(cfg).capture_layers(40)


def test_llama_config_with_draft_vocab_is_eagle3_and_llama4_uses_mlp_size() -> None:
    cfg = Eagle3Config.from_hf_dict(_cfg(architectures=["LlamaForCausalLM"]))
    assert cfg.draft_vocab_size == 64
    l4 = Eagle3Config.from_hf_dict(_cfg(model_type="llama4_text", intermediate_size_mlp=96))
    assert l4.intermediate_size == 96
    with pytest.raises(ConfigError, match="not an EAGLE3"):
        Eagle3Config.from_hf_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 8})


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("t"), "llama4", seed=1, num_hidden_layers=4,
                           no_rope_layers=[1, 1, 1, 1])


def test_head_round_trip_keeps_d2t_and_weights(target: Checkpoint, tmp_path: Path) -> None:
    make_random_eagle3(tmp_path, 32, VOCAB, seed=3, draft_vocab=64)
    model, _ = load_model(target.path, "float32")
    draft = load_eagle3(tmp_path, model)
    raw = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(draft.d2t, raw["d2t"])
    hot = draft.to_target_ids(torch.arange(64))
    assert torch.equal(raw["t2d"].nonzero().squeeze(1), torch.sort(hot).values)
    # shared embedding: the head carries none, so the target's is used
    assert draft.embed_tokens is None
    assert torch.equal(draft.embed(torch.tensor([5])), model.embed_tokens.weight[5:6])


def test_head_loading_is_strict(target: Checkpoint, tmp_path: Path) -> None:
    model, _ = load_model(target.path, "float32")
    make_random_eagle3(tmp_path, 32, VOCAB, seed=3, draft_vocab=64)
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    missing = dict(tensors)
    del missing["midlayer.hidden_norm.weight"]
    save_file(missing, str(f))
    with pytest.raises(LoadError, match="hidden_norm"):
        load_eagle3(tmp_path, model)
    save_file({**tensors, "midlayer.extra.weight": torch.zeros(2)}, str(f))
    with pytest.raises(LoadError, match=r"midlayer\.extra\.weight"):
        load_eagle3(tmp_path, model)
    save_file({**tensors, "fc.weight": torch.zeros(32, 95)}, str(f))
    with pytest.raises(LoadError, match=r"fc\.weight.*shape"):
        load_eagle3(tmp_path, model)
    save_file({**tensors, "d2t": torch.full((64,), 10_000, dtype=torch.long)}, str(f))
    with pytest.raises(LoadError, match="d2t"):
        load_eagle3(tmp_path, model)


def test_head_for_another_target_is_refused(target: Checkpoint, tmp_path: Path) -> None:
    model, _ = load_model(target.path, "float32")
    make_random_eagle3(tmp_path, 32, VOCAB, seed=3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["target_hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="hidden size"):
        load_eagle3(tmp_path, model)


def test_engine_requires_a_draft_for_eagle3(target: Checkpoint) -> None:
    with pytest.raises(ValueError, match="speculative-draft-model-path"):
        target.engine(speculative_algorithm="EAGLE3")


def test_capture_is_off_without_speculation(target: Checkpoint) -> None:
    from specdec.sampling_params import SamplingParams

    engine = target.engine()
    assert engine.spec is None
    req = engine.make_request([1, 2, 3], SamplingParams(max_new_tokens=1))
    assert req.page_table.reserve(3)
    out = engine.runner.extend([req], [[1, 2, 3]])
    assert out.aux_hidden == []
    req.release_kv()


# ---- n-gram ------------------------------------------------------------------------------------------


def test_ngram_tree_continues_the_last_match() -> None:
    ctx = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    # the suffix [1, 2, 3] occurred at the start, followed by 4, 5, 9, 1
    t = ngram_tree(ctx, num_nodes=3, max_depth=5, topk=1, min_match=1, max_match=3)
    assert t.tokens == (3, 4, 5, 9) and t.parents == (-1, 0, 1, 2)


def test_ngram_tree_branches_on_different_continuations() -> None:
    ctx = [7, 1, 8, 7, 2, 7]
    # "7" was followed by 2 (most recent) and by 1
    t = ngram_tree(ctx, num_nodes=4, max_depth=2, topk=2, min_match=1, max_match=1)
    assert t.tokens == (7, 2, 7, 1, 8) and t.parents == (-1, 0, 1, 0, 3)


def test_ngram_tree_without_match_is_just_the_root() -> None:
    t = ngram_tree([1, 2, 3], num_nodes=7, max_depth=5, topk=4, min_match=1, max_match=3)
    assert t.tokens == (3,)

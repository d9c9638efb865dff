"""Structured outputs (json_schema, regex, ebnf) on the embedded SmolLM2: the grammar's mask at
every draft-tree node against a per-node reference, outputs that follow their constraint, and
speculation that stays lossless under constraints (greedy equal to plain decoding token for
token, with EAGLE3 trees and n-gram copies; the grammar also masks the draft)."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import torch

import specdec
from specdec.draft.heads import shipped_head_for_embedded
from specdec.grammar import GrammarSpec, allowed_tokens, apply_bitmask
from specdec.server.chat_template import load_chat_template
from specdec.tree import DraftTree, first_child_next_sibling, path_to, prune_tree

pytestmark = pytest.mark.slow

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                                      "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                  "maxItems": 3}},
     "required": ["name", "age", "hobbies"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                      "country": {"type": "string", "enum": ["France", "Japan", "Peru", "Other"]},
                                      "population_millions": {"type": "integer", "minimum": 0, "maximum": 5000}},
     "required": ["city", "country", "population_millions"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 60}},
     "required": ["answer", "reason"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 2, "maxItems": 5},
]
PROMPTS = ["Describe a fictional person as JSON.", "Give a big city, its country and population as JSON.",
           "Is water wet? Answer as JSON.", "List a few small numbers as a JSON array."]
KW: dict[str, Any] = {"dtype": "float32", "max_total_tokens": 8192, "log_level": "warning"}


@pytest.fixture(scope="module")
def base() -> Any:
    return specdec.Engine(**KW)


def _chat(engine: Any, text: str) -> list[int]:
    prompt = load_chat_template(None, engine.model_path).render([{"role": "user", "content": text}])
    return list(engine.encode(prompt))


def _spec(tree: tuple[int, int, int], **kw: Any) -> Any:
    head = shipped_head_for_embedded()
    assert head is not None
    steps, topk, ndt = tree
    return specdec.Engine(**KW, speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head),
                          speculative_num_steps=steps, speculative_eagle_topk=topk,
                          speculative_num_draft_tokens=ndt, **kw)


def test_tree_links_and_pruning_by_hand() -> None:
    tree = DraftTree((5, 6, 7, 8, 9, 10), (-1, 0, 0, 1, 1, 2))
    first, sibling = first_child_next_sibling(tree)
    assert first.tolist() == [1, 3, 5, -1, -1, -1]
    assert sibling.tolist() == [-1, 2, -1, 4, -1, -1]
    pruned = prune_tree(tree, [True, False, True, True, True, True])  # node 1 goes, so do 3 and 4
    assert pruned.tokens == (5, 7, 10) and pruned.parents == (-1, 0, 1)
    with pytest.raises(ValueError, match="fixed candidates"):
        prune_tree(DraftTree((1, 2), (-1, 0), torch.zeros(2, 4)), [True, True])


def test_tree_bitmask_matches_a_per_node_reference(base: Any) -> None:
    """Each row of the tree's mask equals a fresh matcher fed the emitted tokens plus the node's
    path; refused nodes are found, and rows below them allow everything (never used)."""
    backend = base.grammar_backend()
    spec = GrammarSpec("regex", r"(yes|no), because [a-z ]+\.")
    g = backend.matcher(spec)
    enc = base.encode
    emitted = enc("no, be")
    for t in emitted:
        assert g.accept(t)
    tok = [enc(s)[0] for s in ["cause", " of", "cause", " it", " the", "!", "use"]]
    # root, then 'cause' -> ' it' / ' the', '!' (refused) -> 'use' (below a refused node)
    tree = DraftTree((emitted[-1], tok[0], tok[5], tok[3], tok[4], tok[6]), (-1, 0, 0, 1, 1, 2))
    mask = g.tree_bitmask(tree)
    keep = g.valid_nodes(tree, mask)
    assert keep == [True, True, False, True, True, False]
    for i in range(tree.size):
        if not keep[i]:
            continue
        ref = backend.matcher(spec)
        for t in emitted + [tree.tokens[n] for n in path_to(tree, i)[1:]]:
            assert ref.accept(t)
        assert torch.equal(mask[i], ref.next_bitmask()[0]), f"node {i}"
    assert bool((mask[5] == -1).all())
    assert torch.equal(g.next_bitmask(), backend.matcher(spec).next_bitmask()) is False  # state kept ...
    after = g.bitmask_after([tok[0]])
    assert after is not None and torch.equal(after[0], mask[1])  # ... and bitmask_after restores it
    assert g.bitmask_after([tok[5]]) is None
    logits = torch.zeros(2, base.model_config.vocab_size)
    masked = apply_bitmask(logits, mask[:2])
    assert torch.equal(torch.isfinite(masked), allowed_tokens(mask[:2], logits.shape[1]))


def test_invalid_constraints_are_refused(base: Any) -> None:
    ids = _chat(base, "hi")
    for params, match in [({"regex": "(unclosed"}, "regex is not valid"),
                          ({"ebnf": "root ::= missing"}, "ebnf is not valid"),
                          ({"json_schema": '{"type": 12}'}, "json_schema is not valid"),
                          ({"json_schema": "[1]"}, "JSON object"),
                          ({"regex": "a", "ebnf": 'root ::= "a"'}, "at most one")]:
        with pytest.raises(ValueError, match=match):
            base.generate(input_ids=ids, sampling_params={"max_new_tokens": 4, **params})
    assert base.allocator.num_used_pages == 0


@pytest.mark.parametrize("tree", [(5, 4, 8), (3, 1, 4)])
def test_json_schema_outputs_validate_and_speculation_is_lossless(base: Any, tree: tuple[int, int, int]) -> None:
    engine = _spec(tree)
    batch = [_chat(base, p) for p in PROMPTS]
    params = [{"temperature": 0, "max_new_tokens": 96, "json_schema": json.dumps(s)} for s in SCHEMAS]
    plain = base.generate(input_ids=batch, sampling_params=params)
    spec = engine.generate(input_ids=batch, sampling_params=params)
    for p, s, schema in zip(plain, spec, SCHEMAS, strict=True):
        assert s["output_ids"] == p["output_ids"]
        assert s["meta_info"]["finish_reason"]["type"] == "stop", s["text"]
        jsonschema.validate(json.loads(s["text"]), schema)
        assert s["meta_info"]["spec_verify_ct"] >= 1
    assert engine.allocator.num_used_pages == 0


def test_sampled_outputs_follow_their_schema_with_speculation(base: Any) -> None:
    """temperature 0.9, 3 seeds per schema, EAGLE3 sampled trees plus copies: 100 % valid."""
    engine = _spec((5, 4, 8), speculative_ngram_merge=True)
    for prompt, schema in zip(PROMPTS, SCHEMAS, strict=True):
        ids = _chat(base, prompt)
        for seed in range(3):
            out = engine.generate(input_ids=ids, sampling_params={
                "temperature": 0.9, "seed": seed, "max_new_tokens": 128, "json_schema": json.dumps(schema)})
            assert out["meta_info"]["finish_reason"]["type"] == "stop", out["text"]
            jsonschema.validate(json.loads(out["text"]), schema)
    assert engine.allocator.num_used_pages == 0


def test_regex_and_ebnf_with_speculation(base: Any) -> None:
    engine = _spec((5, 4, 8), speculative_ngram_merge=True)
    ids = _chat(base, "Is the sea salty? Answer yes or no, then why.")
    regex = r"(yes|no), because [a-z ]{1,60}\."
    ebnf = 'root ::= "Answer: " ("yes" | "no") " (" [0-9]+ "% sure)"'
    for params, check in [({"regex": regex}, lambda t: re.fullmatch(regex, t)),
                          ({"ebnf": ebnf}, lambda t: re.fullmatch(r"Answer: (yes|no) \([0-9]+% sure\)", t))]:
        sp = {"temperature": 0, "max_new_tokens": 48, **params}
        out = engine.generate(input_ids=ids, sampling_params=sp)
        assert out["output_ids"] == base.generate(input_ids=ids, sampling_params=sp)["output_ids"]
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            assert check(out["text"]), out["text"]
        else:  # ran out of tokens: what came out is still a prefix of the language
            assert out["meta_info"]["finish_reason"]["type"] == "length"

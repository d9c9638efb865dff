"""Chat templates: built-ins, checkpoint templates, file specs and message validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specdec.server.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    ChatTemplateError,
    load_chat_template,
    validate_messages,
)
from specdec.target.embedded import ensure_embedded_model

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]


def test_chatml_builtin() -> None:
    template = load_chat_template("chatml", None)
    assert template.render(CONVERSATION) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render(CONVERSATION, add_generation_prompt=False).endswith(
        "What is 2+2?<|im_end|>\n"
    )


def test_llama4_builtin() -> None:
    template = load_chat_template("llama-4", None)
    assert template.render(CONVERSATION) == (
        "<|begin_of_text|>"
        "<|header_start|>system<|header_end|>\n\nYou are terse.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHi!<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nHello.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWhat is 2+2?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    assert template.render(CONVERSATION[1:2], add_generation_prompt=False) == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi!<|eot|>"
    )


def test_text_parts_are_joined() -> None:
    template = load_chat_template("chatml", None)
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    assert template.render([{"role": "user", "content": parts}], add_generation_prompt=False) == (
        "<|im_start|>user\nline one\nline two<|im_end|>\n"
    )


def test_checkpoint_template_matches_transformers() -> None:
    from transformers import AutoTokenizer

    model_path = ensure_embedded_model()
    template = load_chat_template(None, model_path)
    assert (template.bos_token, template.eos_token) == ("<|im_start|>", "<|im_end|>")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    for messages in (CONVERSATION, CONVERSATION[1:]):
        expected = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert template.render(messages) == expected
    # SmolLM2's template injects its default system prompt when none is given.
    assert template.render(CONVERSATION[1:2]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )


def test_checkpoint_template_sources(tmp_path: Path) -> None:
    listed = {
        "chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"},
        ]
    }
    assert load_chat_template(None, tmp_path, listed).source == "D"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ bos_token }}X", "bos_token": {"content": "<s>"}})
    )
    template = load_chat_template(None, tmp_path)
    assert template.render([{"role": "user", "content": "u"}]) == "<s>X"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert load_chat_template(None, tmp_path).render(CONVERSATION) == "J4"


def test_checkpoint_without_template_suggests_builtin(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="--chat-template chatml"):
        load_chat_template(None, tmp_path)
    with pytest.raises(ValueError, match="--chat-template chatml"):
        load_chat_template(None, None)
    only_named = {"chat_template": [{"name": "tool_use", "template": "T"}]}
    with pytest.raises(ValueError, match="none named 'default'"):
        load_chat_template(None, tmp_path, only_named)


def test_file_specs(tmp_path: Path) -> None:
    jinja_file = tmp_path / "mine.jinja"
    jinja_file.write_text("{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}")
    template = load_chat_template(str(jinja_file), None)
    assert template.name == str(jinja_file)
    assert template.render(CONVERSATION[:2]) == "[system:You are terse.][user:Hi!]"
    json_file = tmp_path / "tokenizer_config.json"
    json_file.write_text(json.dumps({"chat_template": "{{ messages[0].content }}"}))
    assert load_chat_template(str(json_file), None).render(CONVERSATION) == "You are terse."
    bad_json = tmp_path / "other.json"
    bad_json.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match="no 'chat_template' key"):
        load_chat_template(str(bad_json), None)


def test_bad_spec_lists_builtins(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chatml, llama-4") as raised:
        load_chat_template("no-such-template", None)
    assert "no-such-template" in str(raised.value)
    assert BUILTIN_TEMPLATES == ("chatml", "llama-4", "smollm2")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="not valid Jinja"):
        load_chat_template(str(broken), None)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "at least one message"),
        ("hello", "must be a list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"role": "wizard", "content": "x"}], r"messages\[0\]\.role is 'wizard'"),
        ([{"role": "assistant", "content": None}], "has no content"),  # (fine with tool_calls)
        ([{"content": "x"}], r"role is None"),
        ([{"role": "user"}], "has no content"),
        ([{"role": "user", "content": 3}], "must be a string or a list of text parts"),
        ([{"role": "user", "content": None}], "has no content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "only 'text' parts",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], r"\.text must be a string"),
    ],
)
def test_invalid_messages(messages: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_messages(messages)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        load_chat_template("chatml", None).render(messages)  # type: ignore[arg-type]


def test_sandbox_and_helpers() -> None:
    raising = ChatTemplate("raising", "{{ raise_exception('no system role allowed') }}")
    with pytest.raises(ChatTemplateError, match="no system role allowed"):
        raising.render(CONVERSATION)
    escaping = ChatTemplate("escape", "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        escaping.render(CONVERSATION)
    helpers = ChatTemplate(
        "helpers", "{{ messages[0] | tojson }}|{{ extra_var }}|{{ tools is none }}"
    )
    assert helpers.render([{"role": "user", "content": "é<b>"}], extra_var=7) == (
        '{"role": "user", "content": "é<b>"}|7|True'
    )

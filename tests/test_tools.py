"""Tool calls: the two output formats (server/tool_formats.py), tools / tool_choice validation
and constraints (server/tools.py), a streamed choice's hold-back (server/streaming.py) and the
tool-capable templates (the embedded SmolLM2's renders exactly the checkpoint's without tools)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from server.chat_template import ChatTemplate, load_chat_template, with_tool_parser
from server.state import ApiError
from server.streaming import ChoiceStream
from server.tool_formats import HermesFormat, PythonicFormat, ToolCall
from server.tools import plan_tools
from specdec.sampling_params import SamplingParams
from specdec.target.embedded import ensure_embedded_model

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"}},
                                                "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_pythonic_calls_parse_with_python_and_json_literals() -> None:
    fmt = PythonicFormat()
    content, calls = fmt.parse(' [get_weather(city="Paris", days=3), get_time(), f(x=[1, {"a": null}], y=true, z=None)]\n')
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time", "f"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris", "days": 3}, {},
                                                        {"x": [1, {"a": None}], "y": True, "z": None}]
    for text in ("Paris is sunny.", "[1, 2]", "[get_weather('Paris')]", "[f(**kw)]", "[f(x=open('a'))]",
                 "[get_weather(city=", "[]", "[a.b(x=1)]"):
        assert fmt.parse(text) == (text, []), text


def test_hermes_calls_parse_as_objects_lists_and_several_tags() -> None:
    fmt = HermesFormat()
    text = 'Let me check. <tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>'
    assert fmt.parse(text) == ("Let me check.", [ToolCall("get_weather", '{"city": "Oslo"}')])
    two = ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
           '<tool_call>{"name": "b", "arguments": "{\\"k\\": 1}"}</tool_call>')
    assert fmt.parse(two) == ("", [ToolCall("a", "{}"), ToolCall("b", '{"k": 1}')])
    cut = '<tool_call>[{"name": "a", "arguments": {"x": 1}}]'  # no closing tag (max_tokens, or EOS)
    assert fmt.parse(cut) == ("", [ToolCall("a", '{"x": 1}')])
    for bad in ("no call here", '<tool_call>{"name": "a", "arguments": {"x": </tool_call>',
                '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>[{"name": "a", "arguments": 3}]</tool_call>'):
        assert fmt.parse(bad) == (bad, []), bad


def test_where_a_call_may_start() -> None:
    assert HermesFormat().call_start("Sure. <tool") == 6 and HermesFormat().call_start("Sure. <tool_call>[") == 6
    assert HermesFormat().call_start("a < b") is None and HermesFormat().call_start("x<") == 1
    assert PythonicFormat().call_start("  ") == 0 and PythonicFormat().call_start(" [f(") == 0
    assert PythonicFormat().call_start("The answer") is None


@pytest.mark.parametrize(("tools", "choice", "message"), [
    ([{"type": "function"}], "auto", "tools\\[0\\]"),
    ([{"type": "function", "function": {"name": "bad name"}}], "auto", "name"),
    ([TIME, TIME], "auto", "twice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among"),
    ([WEATHER], "sometimes", "tool_choice must be"),
    (None, "required", "needs tools"),
])
def test_bad_tools_are_400s(tools: Any, choice: Any, message: str) -> None:
    with pytest.raises(ApiError, match=message) as e:
        plan_tools(tools, choice, "hermes")
    assert e.value.status == 400 and e.value.param in ("tools", "tool_choice")


def test_a_template_without_a_tool_format_refuses_auto_tools() -> None:
    with pytest.raises(ApiError, match="no tool-call format") as e:
        plan_tools([WEATHER], None, None)
    assert e.value.param == "tools"
    assert plan_tools([WEATHER], "none", None).tools is None  # none: tools not shown, nothing parsed


def test_required_and_named_choices_constrain_to_valid_calls() -> None:
    required = plan_tools([WEATHER, TIME], "required", "hermes")
    schema = json.loads(required.schema or "")
    good = [{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "other", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert required.parse(json.dumps(good))[1] == [ToolCall("get_weather", '{"city": "Rome"}'),
                                                   ToolCall("get_time", "{}")]
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, "pythonic")
    assert json.loads(named.schema or "") == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert named.parse('{"city": "Rome"}') == (None, [ToolCall("get_weather", '{"city": "Rome"}')])


def test_a_stream_holds_back_a_call_and_sends_it_at_the_end() -> None:
    plan = plan_tools([WEATHER], "auto", "hermes")
    text = 'Checking. <tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>'
    stream = ChoiceStream(SamplingParams(), plan)
    sent = "".join(stream.push(text[i:i + 3]) for i in range(0, len(text), 3))
    assert sent == "Checking. "
    rest, calls = stream.finish(text)
    assert calls == [ToolCall("get_weather", '{"city": "Oslo"}')] and sent + rest == "Checking. "
    # text that only looked like the start of a call is sent once it is known not to be one
    stream = ChoiceStream(SamplingParams(), plan)
    looks = "a <tool> tag, not a call"
    sent = "".join(stream.push(ch) for ch in looks)
    rest, calls = stream.finish(looks)
    assert sent + rest == looks and not calls
    assert "<tool" not in "".join(ChoiceStream(SamplingParams(), plan).push(ch) for ch in "x <tool_c")


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_embedded_template_with_tools_renders_the_checkpoints_without(messages: list[dict[str, str]]) -> None:
    path = ensure_embedded_model()
    ours = load_chat_template(None, path)
    assert ours.name.startswith("smollm2") and ours.tool_format == "hermes"
    source = json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    theirs = ChatTemplate("checkpoint", source)
    for gen in (True, False):
        assert ours.render(messages, gen) == theirs.render(messages, gen)


@pytest.mark.parametrize(("name", "call_text", "tool_role"), [
    ("smollm2", '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]</tool_call>',
     "<|im_start|>user\n<tool_response>\nrainy\n</tool_response>"),
    ("llama-4", '[get_weather(city="Oslo", days=2)]', "<|header_start|>ipython<|header_end|>\n\nrainy<|eot|>"),
])
def test_templates_render_tools_calls_and_results(name: str, call_text: str, tool_role: str) -> None:
    template = load_chat_template(name, None)
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}]},
                {"role": "tool", "content": "rainy", "tool_call_id": "c1"}]
    prompt = template.render(messages, True, tools=[WEATHER])
    assert '"name": "get_weather"' in prompt and call_text in prompt and tool_role in prompt
    # what the template writes for a call is what its format parses back
    fmt = HermesFormat() if name == "smollm2" else PythonicFormat()
    assert fmt.parse(call_text)[1] == [ToolCall("get_weather", '{"city": "Oslo", "days": 2}')]


def test_the_tool_call_parser_flag_overrides_the_templates_format() -> None:
    chatml = load_chat_template("chatml", None)
    assert chatml.tool_format is None and with_tool_parser(chatml, None) is chatml
    assert with_tool_parser(chatml, "llama4").tool_format == "pythonic"
    assert with_tool_parser(chatml, "hermes").tool_format == "hermes"
    assert with_tool_parser(load_chat_template("llama-4", None), "none").tool_format is None
    with pytest.raises(ValueError, match="unknown --tool-call-parser"):
        with_tool_parser(chatml, "mistral")

"""A chat request's tools: what the template is given, what constrains the answer, and how the
answer becomes `tool_calls`.

`tool_choice` (OpenAI's):

* `none` (the default without tools): the tools are not shown to the model and nothing is
  parsed (vLLM shows them unless `--exclude-tools-when-tool-choice-none`; a model shown tools
  may call one, which `none` could then only return as text).
* `auto` (the default with tools): the template describes the tools; the answer is parsed in
  the template's format (server/tool_formats.py) into content and calls.
* `required`: the answer is constrained (the structured-output grammar) to a JSON list of one or
  more calls `[{"name": ..., "arguments": {...}}]` of the listed functions, arguments valid for
  their `parameters` schema; a named function `{"type": "function", "function": {"name": f}}`:
  to one object of `f`'s arguments. vLLM constrains these two the same way, so both work
  whatever the model's own format is (and speculation stays lossless: the grammar masks every
  draft token too).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .state import ApiError
from .tool_formats import FORMATS, ToolCall, ToolFormat

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass(frozen=True)
class ToolPlan:
    mode: str  # none | auto | required | named
    tools: list[dict[str, Any]] | None  # for the template (None: not shown)
    schema: str | None  # JSON schema constraining the answer (required / named)
    fmt: ToolFormat | None  # the template's format (auto)
    named: str | None = None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished answer."""
        if self.mode == "none":
            return text, []
        if self.mode == "named":
            assert self.named is not None
            return None, [ToolCall(self.named, text.strip())]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:  # cut short by max_tokens: return what came as text
                return text, []
            return None, [ToolCall(i["name"], json.dumps(i["arguments"], ensure_ascii=False)) for i in items]
        assert self.fmt is not None
        content, calls = self.fmt.parse(text)
        return (content if content or not calls else None), calls

    def hold_from(self, text: str) -> int | None:
        """Where a stream must stop sending text as content (a call may start there)."""
        if self.mode == "none":
            return None
        if self.mode in ("named", "required"):
            return 0
        assert self.fmt is not None
        return self.fmt.call_start(text)


NO_TOOLS = ToolPlan("none", None, None, None)


def plan_tools(tools: Sequence[Any] | None, tool_choice: Any, tool_format: str | None) -> ToolPlan:
    """Validate `tools` and `tool_choice` (400s naming them) and decide how to serve them."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        return NO_TOOLS
    functions = _functions(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return NO_TOOLS
    if choice == "auto":
        if tool_format is None:
            raise ApiError(400, "this server's chat template has no tool-call format: start it with a "
                           "template that renders `tools` (e.g. --chat-template llama-4) and, for a custom "
                           "one, --tool-call-parser", "tools")
        return ToolPlan("auto", list(tools), None, FORMATS[tool_format])
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for name, params in functions.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        return ToolPlan("required", list(tools), json.dumps(schema), None)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return ToolPlan("named", list(tools), json.dumps(functions[name]), None, named=name)
    raise ApiError(400, "tool_choice must be none, auto, required or "
                   '{"type": "function", "function": {"name": ...}}', "tool_choice")


def _functions(tools: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema of each tool; a malformed tool is a 400."""
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ApiError(400, f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ApiError(400, f"tools[{i}].function.name must be 1-64 letters, digits, _ or -", "tools")
        if name in out:
            raise ApiError(400, f"tools[{i}]: the function name {name!r} is used twice", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON Schema object", "tools")
        out[name] = params
    return out


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def message_tool_calls(calls: Any, index: int) -> list[dict[str, Any]] | None:
    """An assistant message's `tool_calls` for the template, arguments parsed from their JSON
    text (templates write them as objects)."""
    if not calls:
        return None
    out = []
    for call in calls:
        try:
            args = json.loads(call.function.arguments)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"messages[{index}].tool_calls: arguments must be a JSON object: {e}",
                           "messages") from e
        if not isinstance(args, dict):
            raise ApiError(400, f"messages[{index}].tool_calls: arguments must be a JSON object", "messages")
        out.append({"id": call.id, "type": "function",
                    "function": {"name": call.function.name, "arguments": args}})
    return out

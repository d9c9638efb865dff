"""Tool calls in a model's output, in the format its chat template teaches it.

Two formats (the names of vLLM's / SGLang's `--tool-call-parser` values):

* `pythonic` (Llama 4's template): the whole answer is a Python list of calls with keyword
  arguments, `[get_weather(city="Paris", days=3), get_time()]`. Values are literals; JSON's
  `true` / `false` / `null` are taken as well as Python's.
* `hermes` (the embedded SmolLM2's tool template, Hermes' and Qwen's convention): each call is JSON
  inside `<tool_call>...</tool_call>`: an object `{"name": ..., "arguments": {...}}` or a list
  of them; text outside the tags is the message's content.

`parse` splits a finished answer into content and calls; an answer that is not a well-formed
call stays content (a model may write what looks like the start of one). `call_start` tells a
stream where a call may begin, so that text from there on is held back until the answer ends.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)


class ToolFormat(Protocol):
    name: str

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a finished answer."""
        ...

    def call_start(self, text: str) -> int | None:
        """Where in `text` (an answer so far) a call begins or may begin; None: nowhere yet."""
        ...


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    return ast.literal_eval(node)


class PythonicFormat:
    name = "pythonic"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip()
        if not (body.startswith("[") and body.endswith("]")):
            return text, []
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            calls = []
            for call in tree.elts:
                if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
                    return text, []
                args = {}
                for kw in call.keywords:
                    if kw.arg is None:
                        return text, []
                    args[kw.arg] = _literal(kw.value)
                calls.append(ToolCall(call.func.id, json.dumps(args, ensure_ascii=False)))
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            return text, []
        return "", calls

    def call_start(self, text: str) -> int | None:
        body = text.lstrip()
        if not body or body.startswith("["):  # (nothing but blanks yet: it may still start one)
            return 0
        return None


_TAG_OPEN, _TAG_CLOSE = "<tool_call>", "</tool_call>"
_TAGGED = re.compile(re.escape(_TAG_OPEN) + r"(.*?)(?:" + re.escape(_TAG_CLOSE) + r"|\Z)", re.DOTALL)


class HermesFormat:
    name = "hermes"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        if _TAG_OPEN not in text:
            return text, []
        calls: list[ToolCall] = []
        for match in _TAGGED.finditer(text):
            try:
                value = json.loads(match.group(1))
            except json.JSONDecodeError:
                return text, []
            for item in value if isinstance(value, list) else [value]:
                call = self._call(item)
                if call is None:
                    return text, []
                calls.append(call)
        content = _TAGGED.sub("", text).strip()
        return content, calls

    @staticmethod
    def _call(item: Any) -> ToolCall | None:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):  # arguments given as JSON text
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        return ToolCall(item["name"], json.dumps(args, ensure_ascii=False))

    def call_start(self, text: str) -> int | None:
        at = text.find(_TAG_OPEN)
        if at >= 0:
            return at
        for k in range(min(len(_TAG_OPEN) - 1, len(text)), 0, -1):  # a tag may be starting
            if text.endswith(_TAG_OPEN[:k]):
                return len(text) - k
        return None


FORMATS: dict[str, ToolFormat] = {"pythonic": PythonicFormat(), "hermes": HermesFormat()}
PARSER_ALIASES = {"llama4": "pythonic", "llama4_pythonic": "pythonic", "smollm2": "hermes"}

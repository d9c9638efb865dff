"""Chat templates: built-in Jinja templates, checkpoint templates, and sandboxed rendering.

Rendering mirrors Hugging Face's `apply_chat_template`: an immutable sandboxed Jinja environment
with `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, a non-HTML-escaping `tojson`,
and the `raise_exception` / `strftime_now` helpers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

BUILTIN_TEMPLATES: tuple[str, ...] = ("chatml", "llama-4", "smollm2")
ALLOWED_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
# the tool-call format each built-in template teaches (server/tool_formats.py); chatml has none
BUILTIN_TOOL_FORMATS: dict[str, str] = {"llama-4": "pythonic", "smollm2": "hermes"}
# checkpoint templates with no tool format whose built-in equivalent adds one: the built-in
# renders exactly what the checkpoint's does without tools (tests/test_chat_template.py)
_TOOL_EQUIVALENTS: dict[str, str] = {
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}": "smollm2",
}
TEXT_PART_SEPARATOR = "\n"

_TEMPLATE_DIR = "templates"
_CHECKPOINT_TEMPLATE_FILE = "chat_template.jinja"
_CHECKPOINT_TEMPLATE_JSON = "chat_template.json"
_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


class ChatTemplateError(ValueError):
    """A template failed to render (a `raise_exception` call or a Jinja runtime error)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special tokens it is rendered with."""

    name: str
    source: str
    bos_token: str = ""
    eos_token: str = ""
    tool_format: str | None = None  # how answers carry tool calls (tool_formats.FORMATS); None: no tools

    def render(
        self,
        messages: Sequence[Mapping[str, object]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render validated `messages` to the prompt text; `extra` becomes template variables."""
        context: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "tools": None,
            "documents": None,
            **extra,
            "messages": validate_messages(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        template = _compile(self.source, self.name)
        try:
            return template.render(**context)
        except (jinja2.TemplateError, TypeError) as error:
            raise ChatTemplateError(
                f"Chat template {self.name!r} failed to render: {error}"
            ) from error


def validate_messages(messages: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """Check roles and contents; return plain dicts whose `content` is always a string.

    A content given as a list of `{"type": "text", "text": ...}` parts is joined with newlines.
    Keys other than `role` and `content` are passed through unchanged.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of messages, got {type(messages).__name__}.")
    if not messages:
        raise ValueError("messages must contain at least one message.")
    normalized: list[dict[str, object]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be an object, got {type(message).__name__}.")
        role = message.get("role")
        if role not in ALLOWED_ROLES:
            raise ValueError(
                f"messages[{index}].role is {role!r}; expected one of {', '.join(ALLOWED_ROLES)}."
            )
        content = message.get("content")
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise ValueError(f"messages[{index}] ({role}) has no content.")
        plain = dict(message)
        plain["content"] = "" if content is None else _content_text(content, index)
        normalized.append(plain)
    return normalized


def load_chat_template(
    spec: str | None,
    model_path: Path | None,
    tokenizer_config: Mapping[str, Any] | None = None,
) -> ChatTemplate:
    """Pick the chat template to use.

    * `spec=None`: the checkpoint's own template: `chat_template.jinja` in `model_path`, else the
      `chat_template` of `tokenizer_config` (read from `model_path` when not given; a string or a
      list of named templates, whose `default` is used), else `chat_template.json`.
    * `spec` a built-in name (`chatml`, `llama-4`): that template.
    * `spec` an existing file: its content; a `.json` file must hold a `chat_template` key.

    The checkpoint's `bos_token`/`eos_token` (when known) are attached for rendering.
    """
    config = _read_tokenizer_config(model_path) if tokenizer_config is None else tokenizer_config
    bos_token, eos_token = _special_tokens(config, model_path)
    tool_format = None
    if spec is None:
        name, source = _checkpoint_template(model_path, config)
        if source in _TOOL_EQUIVALENTS:  # e.g. the embedded SmolLM2's: its built-in adds tools
            spec = _TOOL_EQUIVALENTS[source]
            name, source, tool_format = f"{spec} (the checkpoint's template, with tools)", _builtin_source(spec), \
                BUILTIN_TOOL_FORMATS.get(spec)
    elif spec in BUILTIN_TEMPLATES:
        name, source, tool_format = spec, _builtin_source(spec), BUILTIN_TOOL_FORMATS.get(spec)
    elif spec and Path(spec).expanduser().is_file():
        name, source = spec, _file_source(Path(spec).expanduser())
    else:
        raise ValueError(
            f"Unknown chat template {spec!r}: not a built-in template "
            f"({', '.join(BUILTIN_TEMPLATES)}) and not an existing file."
        )
    _compile(source, name)
    return ChatTemplate(name=name, source=source, bos_token=bos_token, eos_token=eos_token,
                        tool_format=tool_format)


def with_tool_parser(template: ChatTemplate, parser: str | None) -> ChatTemplate:
    """`--tool-call-parser`: the tool-call format of answers under `template` (which must render
    `tools`); None keeps the template's own, `none` refuses tools."""
    from .tool_formats import FORMATS, PARSER_ALIASES

    if parser is None:
        return template
    name = PARSER_ALIASES.get(parser, parser)
    if name != "none" and name not in FORMATS:
        raise ValueError(f"unknown --tool-call-parser {parser!r}: {', '.join([*FORMATS, *PARSER_ALIASES, 'none'])}")
    return dataclasses.replace(template, tool_format=None if name == "none" else name)


def _content_text(content: object, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
        raise ValueError(
            f"messages[{index}].content must be a string or a list of text parts, "
            f"got {type(content).__name__}."
        )
    texts: list[str] = []
    for part_index, part in enumerate(content):
        where = f"messages[{index}].content[{part_index}]"
        if not isinstance(part, Mapping):
            raise ValueError(f"{where} must be an object, got {type(part).__name__}.")
        if part.get("type") != "text":
            raise ValueError(
                f"{where} has type {part.get('type')!r}; only 'text' parts are supported."
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}.text must be a string, got {type(text).__name__}.")
        texts.append(text)
    return TEXT_PART_SEPARATOR.join(texts)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


@functools.lru_cache(maxsize=32)
def _compile(source: str, name: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(
            f"Chat template {name!r} is not valid Jinja (line {error.lineno}): {error.message}"
        ) from error


def _builtin_source(name: str) -> str:
    return (
        resources.files(__package__ or "specdec.server")
        .joinpath(_TEMPLATE_DIR, f"{name}.jinja")
        .read_text(encoding="utf-8")
    )


def _file_source(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        return text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"Chat template file {str(path)!r} is not valid JSON: {error}") from error
    template = _template_entry(data.get("chat_template") if isinstance(data, dict) else None)
    if template is None:
        raise ValueError(f"Chat template file {str(path)!r} has no 'chat_template' key.")
    return template


def _template_entry(value: object) -> str | None:
    """A `chat_template` value: a string, or a list of `{"name", "template"}` (the default used)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            entry.get("name"): entry.get("template")
            for entry in value
            if isinstance(entry, Mapping)
        }
        default = named.get("default")
        if isinstance(default, str):
            return default
        names = ", ".join(str(name) for name in named)
        raise ValueError(
            f"The checkpoint defines several chat templates ({names}) but none named 'default'; "
            "pass one explicitly with --chat-template."
        )
    raise ValueError(
        f"chat_template must be a string or a list of named templates, got {type(value).__name__}."
    )


def _read_json_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must contain a JSON object.")
    return data


def _read_tokenizer_config(model_path: Path | None) -> Mapping[str, Any]:
    if model_path is None:
        return {}
    return _read_json_object(model_path / _TOKENIZER_CONFIG_FILE) or {}


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _special_tokens(config: Mapping[str, Any], model_path: Path | None) -> tuple[str, str]:
    fallback: Mapping[str, Any] = {}
    if model_path is not None:
        fallback = _read_json_object(model_path / _SPECIAL_TOKENS_MAP_FILE) or {}
    tokens: list[str] = []
    for key in ("bos_token", "eos_token"):
        text = _token_text(config.get(key))
        tokens.append(text if text is not None else _token_text(fallback.get(key)) or "")
    return tokens[0], tokens[1]


def _checkpoint_template(model_path: Path | None, config: Mapping[str, Any]) -> tuple[str, str]:
    where = str(model_path) if model_path is not None else "the checkpoint"
    name = f"{model_path} (checkpoint)" if model_path is not None else "checkpoint"
    if model_path is not None and (model_path / _CHECKPOINT_TEMPLATE_FILE).is_file():
        return name, (model_path / _CHECKPOINT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = _template_entry(config.get("chat_template"))
    if template is None and model_path is not None:
        processor_config = _read_json_object(model_path / _CHECKPOINT_TEMPLATE_JSON) or {}
        template = _template_entry(processor_config.get("chat_template"))
    if template is None:
        raise ValueError(
            f"{where} has no chat template (no {_CHECKPOINT_TEMPLATE_FILE}, and no chat_template in "
            f"{_TOKENIZER_CONFIG_FILE}); choose one with e.g. `--chat-template chatml` "
            f"(built-in: {', '.join(BUILTIN_TEMPLATES)})."
        )
    return name, template

"""The model's default sampling parameters: `generation_config.json` and vLLM's
`--generation-config` / `--override-generation-config`.

vLLM's semantics (`ModelConfig.get_diff_sampling_param`):

* `--generation-config auto` (the default) reads the model folder's `generation_config.json`,
  `vllm` reads nothing (the engine's neutral defaults), any other value is a folder holding a
  `generation_config.json`;
* `--override-generation-config` is a JSON object merged over it (a key set to null drops the
  file's value);
* of the result, `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty` and
  `max_new_tokens` (vLLM's default `max_tokens`) become the defaults of every request that does
  not set them; a request's own value always wins, and a null in a request means "the default".

The override also takes `attn_temperature_tuning` (vLLM's Llama 4 guide passes
`'{"attn_temperature_tuning": true}'` this way): it sets the model config's flag of that name
(query scaling on Llama 4's NoPE layers) before the model is built.

Other keys of `generation_config.json` (eos_token_id, do_sample, ...) are not sampling defaults
here (EOS ids are read by the engine; vLLM ignores do_sample too). An override key that is none
of the above is refused, naming it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = [
    "FILE_NAME",
    "GENERATION_CONFIG_MODES",
    "MODEL_KEYS",
    "SAMPLING_KEYS",
    "GenerationDefaults",
    "load_generation_defaults",
    "parse_override",
]

FILE_NAME = "generation_config.json"
GENERATION_CONFIG_MODES = ("auto", "vllm")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")
"""The generation_config keys vLLM turns into request defaults (max_new_tokens as max_tokens)."""
MODEL_KEYS = ("attn_temperature_tuning",)
"""Override keys that change the model config rather than sampling."""

_INT_KEYS = ("top_k", "max_new_tokens")


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """The defaults in effect: None = not set (the engine's own default applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    attn_temperature_tuning: bool | None = None
    source: str = "engine defaults"  # where they came from, for the start-up log line

    def __post_init__(self) -> None:
        for key in SAMPLING_KEYS + MODEL_KEYS:
            _check_type(key, getattr(self, key), "generation defaults")
        sampling = self.sampling
        if sampling:  # SamplingParams' own range checks, with its messages (they name the key)
            from .sampling_params import SamplingParams

            try:
                SamplingParams(**sampling)
            except ValueError as e:
                raise ValueError(f"{self.source}: {e}") from e
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"{self.source}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling defaults that are set, as `SamplingParams` keyword arguments."""
        return {k: getattr(self, k) for k in SAMPLING_KEYS if getattr(self, k) is not None}

    def as_dict(self) -> dict[str, Any]:
        """Everything set, for /get_server_info."""
        out = dict(self.sampling)
        if self.attn_temperature_tuning is not None:
            out["attn_temperature_tuning"] = self.attn_temperature_tuning
        return out

    def describe(self) -> str:
        """One line for the start-up log."""
        items = self.as_dict()
        if not items:
            return "none (the engine's defaults)"
        return ", ".join(f"{k}={v}" for k, v in items.items()) + f" (from {self.source})"


def _check_type(key: str, value: Any, where: str) -> None:
    if value is None:
        return
    if key in MODEL_KEYS:
        ok = isinstance(value, bool)
        want = "true or false"
    elif key in _INT_KEYS:
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        want = "a finite number"
    if not ok:
        raise ValueError(f"{where}: {key} must be {want}, got {value!r}")


def parse_override(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """`--override-generation-config`: a JSON object (as text, or already a mapping) whose keys
    are SAMPLING_KEYS or MODEL_KEYS with values of their type, or null. Raises ValueError naming
    the problem (bad JSON, not an object, an unknown or ill-typed key)."""
    where = "--override-generation-config"
    if value is None:
        return {}
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e}); pass an object such as "
                             "'{\"temperature\": 0.6}'") from e
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(value).__name__}")
    known = SAMPLING_KEYS + MODEL_KEYS
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (accepted: {', '.join(known)})")
    for key, v in value.items():
        _check_type(key, v, where)
    return dict(value)


def _read_file(folder: Path) -> dict[str, Any]:
    """The sampling keys of `folder/generation_config.json`; {} when the file is absent."""
    path = folder / FILE_NAME
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    out = {k: raw[k] for k in SAMPLING_KEYS if raw.get(k) is not None}
    for key, v in out.items():
        _check_type(key, v, str(path))
    return out


def load_generation_defaults(
    mode: str,
    override: str | Mapping[str, Any] | None,
    model_path: str | Path,
) -> GenerationDefaults:
    """The defaults in effect for `--generation-config mode` and `--override-generation-config`."""
    config: dict[str, Any] = {}
    sources: list[str] = []
    if mode != "vllm":
        folder = Path(model_path) if mode == "auto" else Path(mode)
        if mode != "auto" and not (folder / FILE_NAME).is_file():
            raise ValueError(f"--generation-config {mode}: no {FILE_NAME} in that folder "
                             "(pass auto, vllm or a folder holding one)")
        config = _read_file(folder)
        if config:
            sources.append(str(folder / FILE_NAME))
    extra = parse_override(override)
    if extra:
        sources.append("--override-generation-config")
    config.update(extra)
    values = {k: v for k, v in config.items() if v is not None}
    names = {f.name for f in fields(GenerationDefaults)}
    assert set(values) <= names
    return GenerationDefaults(**values, source=" + ".join(sources) or "engine defaults")

"""Per-request sampling parameters, named and defaulted as in SGLang.

A request's :class:`SamplingParams` decides how the next token is drawn from the
model's logits (penalties, temperature, top-k / top-p / min-p truncation) and
when generation stops (token budget, stop strings, stop token ids, EOS).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["GRAMMAR_FIELDS", "GREEDY_TEMPERATURE_EPS", "SamplingParams"]

GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf")
"""Fields that constrain the output (SGLang's names; specdec/grammar.py); at most one per request."""

GREEDY_TEMPERATURE_EPS = 1e-6
"""Temperatures below this are treated as greedy (as SGLang does); dividing
logits by them would overflow."""


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample one request.

    Attributes:
        max_new_tokens: Upper bound on generated tokens (0 = prefill only).
        temperature: Logit divisor; 0 means greedy decoding.
        top_p: Nucleus sampling: keep the smallest set of most likely tokens whose
            cumulative probability reaches ``top_p`` (1 = disabled).
        top_k: Keep only the ``top_k`` most likely tokens (-1 or 0 = disabled).
        min_p: Drop tokens whose probability is below ``min_p`` times the most
            likely token's probability (0 = disabled).
        frequency_penalty: Subtracted from a token's logit once per previous
            occurrence in the output (OpenAI semantics), in [-2, 2].
        presence_penalty: Subtracted from a token's logit if it occurred in the
            output at all (OpenAI semantics), in [-2, 2].
        repetition_penalty: Divides positive / multiplies negative logits of
            tokens seen in prompt or output (HF semantics; 1 = disabled).
        stop: Strings that end generation when they appear in the output.
        stop_token_ids: Token ids that end generation (besides EOS).
        ignore_eos: Keep generating after the EOS token.
        seed: Seed of the request's private RNG (None = drawn from the global RNG).
        skip_special_tokens: Omit special tokens when detokenizing.
        json_schema: Constrain the output to JSON matching this schema (a JSON object as text).
        regex: Constrain the output to this regular expression.
        ebnf: Constrain the output to this EBNF grammar (SGLang's / xgrammar's dialect, root
            rule ``root``). At most one of the three; see specdec/grammar.py.
        logit_bias: ``(token_id, bias)`` pairs added to those tokens' logits before sampling
            (OpenAI semantics: bias in [-100, 100]; -100 in effect bans a token, 100 forces it).
            ``from_dict`` also takes OpenAI's ``{"token_id": bias}`` mapping.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(
                f"top_k must be an integer >= -1 (-1 or 0 = disabled), got {self.top_k!r}"
            )
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

        if not isinstance(self.stop, (tuple, list)):
            raise ValueError(f"stop must be a tuple of strings, got {type(self.stop).__name__}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop entries must be non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", tuple(self.stop))

        if not isinstance(self.stop_token_ids, (tuple, list)):
            raise ValueError(
                "stop_token_ids must be a tuple of integers, "
                f"got {type(self.stop_token_ids).__name__}"
            )
        for t in self.stop_token_ids:
            if not is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids entries must be integers >= 0, got {t!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.logit_bias, (tuple, list)):
            raise ValueError(f"logit_bias must be (token_id, bias) pairs, got {type(self.logit_bias).__name__}")
        pairs = []
        for pair in self.logit_bias:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"logit_bias entries must be (token_id, bias) pairs, got {pair!r}")
            tid, bias = pair
            if not is_int(tid) or tid < 0:
                raise ValueError(f"logit_bias token ids must be integers >= 0, got {tid!r}")
            if not is_number(bias) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {tid}")
            pairs.append((tid, float(bias)))
        object.__setattr__(self, "logit_bias", tuple(sorted(dict(pairs).items())))
        given = [name for name in GRAMMAR_FIELDS if getattr(self, name) is not None]
        for name in given:
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if len(given) > 1:
            raise ValueError(f"{given[0]} and {given[1]} both constrain the output: pass at most one")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema must be a JSON object as a string: {e}") from e
            if not isinstance(schema, dict):
                raise ValueError("json_schema must be a JSON object as a string")

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0 or top_k 1)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def adjusts_logits(self) -> bool:
        """True when penalties (frequency, presence, repetition) or a logit bias change the
        logits (`sampler.apply_penalties`), so that the raw argmax is not the greedy token."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None,
                  defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """Build from a JSON-style dict such as SGLang's ``sampling_params``.

        ``stop`` may be a single string or a list of strings; ``stop_token_ids`` a
        list. A key whose value is ``None`` takes the default: ``defaults`` (the model's
        generation-config defaults, specdec/generation_config.py) where it has the key,
        else the field's own. Unknown keys raise ``ValueError`` naming them.
        """
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ValueError(f"sampling_params must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = dict(defaults or {})
        kwargs.update((k, v) for k, v in d.items() if v is not None)
        stop = kwargs.get("stop")
        if isinstance(stop, str):
            kwargs["stop"] = (stop,)
        elif isinstance(stop, list):
            kwargs["stop"] = tuple(stop)
        bias = kwargs.get("logit_bias")
        if isinstance(bias, Mapping):  # OpenAI's {"token_id": bias}
            pairs = []
            for k, v in bias.items():
                try:
                    pairs.append((int(k), v))
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
            kwargs["logit_bias"] = tuple(pairs)
        stop_token_ids = kwargs.get("stop_token_ids")
        if isinstance(stop_token_ids, list):
            kwargs["stop_token_ids"] = tuple(stop_token_ids)
        return cls(**kwargs)

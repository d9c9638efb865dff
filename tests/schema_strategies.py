"""Hypothesis strategies for the JSON Schema subset that msgspec emits (tests/test_fuzz.py).

msgspec's schemas use `$ref` into `components/schemas`, `anyOf`, `type` (object with
`properties` / `required` / `additionalProperties`, array with optional `items`, string,
integer, number, boolean, null) and `{}` for any value. That is all this converter reads, so it
needs no dependency beyond hypothesis (hypothesis-jsonschema and schemathesis would pull a
dozen packages into the lock for it). Overrides replace the strategy of a property named
`Struct.field` (to keep token counts small, or to draw sensible values); `force` makes optional
properties always present (a chat request without max_tokens may run to the context's end).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

REF_PREFIX = "#/components/schemas/"
MAX_TEXT = 40  # characters in a drawn string
MAX_ITEMS = 4  # elements in a drawn array or object

_SCALAR: SearchStrategy[Any] = (st.none() | st.booleans() | st.integers()
                                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=MAX_TEXT))
ANY_JSON: SearchStrategy[Any] = st.recursive(
    _SCALAR,
    lambda inner: st.lists(inner, max_size=MAX_ITEMS) | st.dictionaries(st.text(max_size=12), inner, max_size=MAX_ITEMS),
    max_leaves=10,
)
"""Any JSON value (what `{}` admits)."""


class SchemaStrategies:
    """Strategies for the schemas of one OpenAPI document's components."""

    def __init__(self, components: Mapping[str, Any], overrides: Mapping[str, SearchStrategy[Any]] | None = None,
                 force: frozenset[str] = frozenset()) -> None:
        self.components = components
        self.overrides = dict(overrides or {})
        self.force = force
        self._refs: dict[str, SearchStrategy[Any]] = {}

    def ref(self, name: str) -> SearchStrategy[Any]:
        """The strategy of the component `name` (built once)."""
        if name not in self._refs:
            self._refs[name] = st.deferred(lambda: self.schema(self.components[name]))
        return self._refs[name]

    def schema(self, schema: Mapping[str, Any]) -> SearchStrategy[Any]:
        """Values valid under `schema`."""
        if "$ref" in schema:
            ref = str(schema["$ref"])
            if not ref.startswith(REF_PREFIX):
                raise ValueError(f"unsupported $ref {ref!r}")
            return self.ref(ref[len(REF_PREFIX):])
        if "anyOf" in schema:
            return st.one_of([self.schema(s) for s in schema["anyOf"]])
        if "enum" in schema:
            return st.sampled_from(list(schema["enum"]))
        kind = schema.get("type")
        if kind is None:
            return ANY_JSON
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            items = self.schema(schema["items"]) if "items" in schema else ANY_JSON
            return st.lists(items, max_size=MAX_ITEMS)
        simple: dict[str, SearchStrategy[Any]] = {
            "string": st.text(max_size=MAX_TEXT),
            "integer": st.integers(),
            "number": st.integers() | st.floats(allow_nan=False, allow_infinity=False),
            "boolean": st.booleans(),
            "null": st.none(),
        }
        if kind not in simple:
            raise ValueError(f"unsupported schema type {kind!r}")
        return simple[kind]

    def _object(self, schema: Mapping[str, Any]) -> SearchStrategy[Any]:
        props: Mapping[str, Any] = schema.get("properties", {})
        if not props:
            extra = schema.get("additionalProperties")
            values = self.schema(extra) if isinstance(extra, Mapping) else ANY_JSON
            return st.dictionaries(st.text(max_size=12), values, max_size=MAX_ITEMS)
        title = str(schema.get("title", ""))
        required = set(schema.get("required", []))
        must: dict[str, SearchStrategy[Any]] = {}
        may: dict[str, SearchStrategy[Any]] = {}
        for name, sub in props.items():
            key = f"{title}.{name}"
            strategy = self.overrides[key] if key in self.overrides else self.schema(sub)
            (must if name in required or key in self.force else may)[name] = strategy
        return st.fixed_dictionaries(must, optional=may)

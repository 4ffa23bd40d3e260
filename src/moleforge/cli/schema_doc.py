"""The spec reference in Markdown, rendered from ``AdapterSpec.model_json_schema()``:
one section per spec object, one table row per field (type, default, constraints)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["render_reference"]

_BOUNDS = (("minimum", ">= {}"), ("exclusiveMinimum", "> {}"), ("maximum", "<= {}"), ("exclusiveMaximum", "< {}"),
           ("minItems", "at least {} item(s)"), ("maxItems", "at most {} item(s)"), ("pattern", "matches `{}`"))


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(s: dict[str, Any]) -> str:
    """A short type expression: ``int``, ``list[Site]``, ``TopKRouter | DenseRouter``, ``"tanh" | "relu"``."""
    if "$ref" in s:
        name = _ref_name(s["$ref"])
        return f"[{name}](#{name.lower()})"
    if "const" in s:
        return f'`"{s["const"]}"`'
    if "enum" in s:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in s["enum"])
    for key in ("anyOf", "oneOf"):
        if key in s:
            return " \\| ".join(_type(x) for x in s[key])
    t = s.get("type")
    if t == "array":
        if "prefixItems" in s:
            return "[" + ", ".join(_type(x) for x in s["prefixItems"]) + "]"
        return f"list[{_type(s.get('items', {}))}]"
    if t == "object":
        return "object"
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null"}.get(t, "any")


def _constraints(s: dict[str, Any]) -> str:
    parts = [fmt.format(s[k]) for k, fmt in _BOUNDS if k in s]
    for key in ("anyOf", "oneOf"):
        for x in s.get(key, []):
            parts += [fmt.format(x[k]) for k, fmt in _BOUNDS if k in x]
    if "items" in s and isinstance(s["items"], dict):
        parts += [f"each {fmt.format(s['items'][k])}" for k, fmt in _BOUNDS if k in s["items"]]
    return ", ".join(dict.fromkeys(parts))


def _default(field: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in field:
        return ""
    return "`" + json.dumps(field["default"], ensure_ascii=False) + "`"


def _section(name: str, s: dict[str, Any]) -> list[str]:
    lines = [f"## {name}", ""]
    if s.get("description"):
        lines += [" ".join(s["description"].split()), ""]
    props = s.get("properties", {})
    if not props:
        return lines + ["No fields.", ""]
    lines += ["| field | type | default | constraints |", "|---|---|---|---|"]
    required = set(s.get("required", []))
    for field, spec in props.items():
        lines.append(f"| `{field}` | {_type(spec)} | {_default(spec, field in required)} | {_constraints(spec)} |")
    return lines + [""]


def render_reference(schema: dict[str, Any]) -> str:
    """The whole reference: the top object first, then every definition by name."""
    defs = schema.get("$defs", {})
    lines = [
        "# Spec reference",
        "",
        "Generated from `moleforge.AdapterSpec.model_json_schema()` by `scripts/gen_spec_reference.py`;",
        "do not edit by hand. `moleforge schema` prints the JSON Schema itself. Every object is closed:",
        "an unknown field is an error that names its path. Variants are chosen by their `kind`.",
        "",
        "Objects: " + ", ".join(f"[{n}](#{n.lower()})" for n in [schema.get("title", "AdapterSpec"), *sorted(defs)]),
        "",
    ]
    lines += _section(schema.get("title", "AdapterSpec"), schema)
    for name in sorted(defs):
        lines += _section(name, defs[name])
    return "\n".join(lines).rstrip() + "\n"

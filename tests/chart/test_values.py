"""values.yaml is the one truth: every value documented by a `# --` comment, values.schema.json
describing exactly its keys with the types of its defaults, the README's table generated."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import jsonschema
import yaml
from support import chart

_spec = importlib.util.spec_from_file_location("values_doc", chart.ROOT / "charts" / "values_doc.py")
assert _spec is not None and _spec.loader is not None
values_doc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(values_doc)

VALUES_TEXT = (chart.CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
SCHEMA = json.loads((chart.CHART / "values.schema.json").read_text())
TYPES = {bool: "boolean", int: "integer", str: "string", list: "array", dict: "object"}


def _leaves(values: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(values, dict) and values:
        return [leaf for key, value in values.items() for leaf in _leaves(value, (*path, key))]
    return [path]


def test_every_value_is_documented() -> None:
    documented = values_doc.documented(VALUES_TEXT)
    undocumented = [
        ".".join(leaf)
        for leaf in _leaves(VALUES)
        if not any(leaf[:n] in documented for n in range(1, len(leaf) + 1))
    ]
    assert undocumented == []


def _compare(values: Any, schema: dict[str, Any], path: str) -> list[str]:
    problems = []
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if TYPES[type(values)] not in types:
        problems.append(f"{path}: default {values!r} is not {types}")
    if isinstance(values, dict) and "properties" in schema:
        if schema.get("additionalProperties") is not False:
            problems.append(f"{path}: additionalProperties must be false")
        if set(schema["properties"]) != set(values):
            problems.append(f"{path}: schema {sorted(schema['properties'])} != values {sorted(values)}")
        for key in set(schema["properties"]) & set(values):
            problems += _compare(values[key], schema["properties"][key], f"{path}.{key}")
    return problems


def test_the_schema_describes_exactly_the_values() -> None:
    assert _compare(VALUES, SCHEMA, "") == []
    jsonschema.validate(VALUES, SCHEMA)


def test_the_readme_table_is_current() -> None:
    assert values_doc.readme_with_table(chart.CHART) == (chart.CHART / "README.md").read_text(), (
        "run: .venv/bin/python charts/values_doc.py charts/billingproxy"
    )

"""Validating objects against the CRDs' openAPIV3Schema with jsonschema, as the API server would.

Two things the API server does that plain JSON Schema does not, added here:
- unknown fields are refused (kubectl's default ``--validate=strict``): every object schema with
  ``properties`` gets ``additionalProperties: false`` unless it preserves unknown fields;
- ``x-kubernetes-list-type: set`` means unique items.
And the formats the schemas use are checked for real (jsonschema skips ``date-time`` unless an
optional package is installed): RFC 3339 times, and ``email``.
CEL rules (``x-kubernetes-validations``) are not evaluated here; see test_crds.py.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = {
    "Wallet": ROOT / "crds" / "billingproxy.io_wallets.yaml",
    "ApiKey": ROOT / "crds" / "billingproxy.io_apikeys.yaml",
}
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")

FORMATS = jsonschema.FormatChecker(formats=["email"])


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.fullmatch(value):
        raise ValueError(f"{value!r} is not an RFC 3339 time")
    dt.datetime.fromisoformat(value)
    return True


def crd(kind: str) -> dict[str, Any]:
    return yaml.safe_load(CRDS[kind].read_text())


def version(kind: str) -> dict[str, Any]:
    (served,) = [v for v in crd(kind)["spec"]["versions"] if v["name"] == "v1alpha1"]
    return served


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in schema
    ):
        schema["additionalProperties"] = False
    if schema.get("x-kubernetes-list-type") == "set":
        schema["uniqueItems"] = True
    for sub in schema.get("properties", {}).values():
        _strict(sub)
    if isinstance(schema.get("items"), dict):
        _strict(schema["items"])
    return schema


@functools.cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    schema = _strict(copy.deepcopy(version(kind)["schema"]["openAPIV3Schema"]))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema, format_checker=FORMATS)


def errors(obj: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator(obj["kind"]).iter_errors(obj)
    ]


def assert_valid(obj: dict[str, Any]) -> None:
    """The object, spec and status, as a cluster would store it without pruning anything."""
    problems = errors(obj)
    assert not problems, f"{obj['kind']} {obj['metadata'].get('name')} violates its CRD: {problems}"

"""The Envoy↔sidecar contract (authz_sidecar/contract.py) reaches the Lua filters whole.

Lua cannot import Python, so envoy_config renders the contract's values into usage_filter.lua.
These tests fail when the Lua file gains a literal copy of a contract value, names a value the
contract does not define, or loses one it needs, and when the Lua tables name a usage format
billing.usage does not know.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from authz_sidecar import contract, envoy_config
from billing import settings, usage

LUA_FILES = (envoy_config.LUA_SOURCE, envoy_config.UPSTREAM_HEADERS_SOURCE)
DEMO_BACKEND = "http://127.0.0.1:4000"


def lua_code(source: str) -> str:
    """The source without its comments (no string in these files holds "--")."""
    return "\n".join(line.split("--", 1)[0] for line in source.splitlines())


def lua_strings(source: str) -> list[str]:
    return re.findall(r'"((?:[^"\\]|\\.)*)"', lua_code(source))


def test_the_rendered_filter_has_each_contract_value_under_its_name() -> None:
    rendered = envoy_config.usage_filter_lua()
    for name, value in contract.LUA_CONSTANTS.items():
        assert re.findall(rf"^local {name} = (.*)$", rendered, re.MULTILINE) == [f'"{value}"'], name
    assert "-- rendered: contract" not in rendered


def test_envoy_runs_the_rendered_filter() -> None:
    config = envoy_config.render(
        settings.Settings(access_log_secret="s3cret-for-the-access-log-0123456789abcdef"),
        backend_url=DEMO_BACKEND,
    )
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (lua,) = [f for f in manager["http_filters"] if f["name"] == envoy_config.LUA_FILTER]
    assert lua["typed_config"]["default_source_code"]["inline_string"] == envoy_config.usage_filter_lua()


def test_rendering_keeps_the_line_numbers() -> None:
    source = envoy_config.LUA_SOURCE.read_text(encoding="utf-8")
    assert len(envoy_config.usage_filter_lua().splitlines()) == len(source.splitlines())


@pytest.mark.parametrize("path", LUA_FILES, ids=lambda path: path.name)
def test_no_lua_file_keeps_a_copy_of_a_contract_value(path: Path) -> None:
    shared = {
        contract.AUTHZ_NAMESPACE,
        contract.USAGE_NAMESPACE,
        contract.ACCESS_LOG_SECRET_HEADER,
        contract.CHECK_PATH_PREFIX,
    }
    copies = [
        text
        for text in lua_strings(path.read_text(encoding="utf-8"))
        if text in shared or text.startswith(contract.METADATA_HEADER_PREFIX)
    ]
    assert copies == []


def test_the_filter_publishes_only_the_contracts_names() -> None:
    code = lua_code(envoy_config.LUA_SOURCE.read_text(encoding="utf-8"))
    published = set(re.findall(r"\bpublish\(([^,]+),", code))
    # The JSON answer's capture is published under its capture name, which JSON_PATHS sets.
    assert published == {"USAGE", "USAGE_START", "FINISHED", "name"}
    assert re.search(r"^local JSON_PATHS = \{usage = USAGE\}$", code, re.MULTILINE)


def test_a_marker_the_contract_does_not_define_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = envoy_config.LUA_SOURCE.read_text(encoding="utf-8")
    extra = tmp_path / "usage_filter.lua"
    extra.write_text("local TYPO_KEY = nil  -- rendered: contract\n" + source, encoding="utf-8")
    monkeypatch.setattr(envoy_config, "LUA_SOURCE", extra)
    with pytest.raises(envoy_config.EnvoyRenderError, match="does not define"):
        envoy_config.usage_filter_lua()


def test_a_missing_marker_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = envoy_config.LUA_SOURCE.read_text(encoding="utf-8")
    marker = "local FINISHED = nil  -- rendered: contract\n"
    assert marker in source
    missing = tmp_path / "usage_filter.lua"
    missing.write_text(source.replace(marker, ""), encoding="utf-8")
    monkeypatch.setattr(envoy_config, "LUA_SOURCE", missing)
    with pytest.raises(envoy_config.EnvoyRenderError, match="FINISHED"):
        envoy_config.usage_filter_lua()


@pytest.mark.parametrize("table", ["SSE_PATHS", "SSE_RELEVANT", "SSE_EVENTS"])
def test_the_filters_formats_are_billings(table: str) -> None:
    code = lua_code(envoy_config.LUA_SOURCE.read_text(encoding="utf-8"))
    (body,) = re.findall(rf"^local {table} = \{{\n(.*?)^\}}", code, re.MULTILINE | re.DOTALL)
    named = re.findall(r"^  ([a-z_]+) = ", body, re.MULTILINE)
    assert named
    assert set(named) <= {known.value for known in usage.Format}


def test_a_fact_travels_as_a_header_and_back() -> None:
    assert contract.metadata_header("hold_id") == contract.HOLD_ID == "x-billingproxy-hold-id"
    assert contract.STREAM_USAGE == "x-billingproxy-stream-usage"
    for value in ("gpt-4o-mini", "gemini/gemini-2.5-flash", "we\r\nird model ü", "%41"):
        encoded = contract.metadata_value(value)
        assert encoded.isascii() and "\r" not in encoded and "\n" not in encoded and " " not in encoded
        assert contract.metadata_read(encoded) == value


def test_no_setting_can_forward_the_contracts_headers_to_the_backend() -> None:
    # The core cannot import the sidecar, so settings.py names the prefix itself.
    assert contract.METADATA_HEADER_PREFIX in settings.UPSTREAM_PREFIXES_NEVER
    assert contract.ACCESS_LOG_SECRET_HEADER.startswith(contract.METADATA_HEADER_PREFIX)

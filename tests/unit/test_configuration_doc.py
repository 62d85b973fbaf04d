"""docs/configuration.md is what the settings' own comments render, and every setting has one.

Why: the page is generated (billingproxy/settings_reference.py, `make docs`), so the one place
to describe a setting is the `# --` comment beside its field; these tests catch a page left
stale and a setting added without its comment.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from billing import settings
from billingproxy import settings_reference

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_page_is_what_the_settings_render() -> None:
    assert PAGE.read_text(encoding="utf-8") == settings_reference.render(), (
        "docs/configuration.md is stale: run `make docs` and commit the result"
    )


def test_every_core_setting_has_a_comment() -> None:
    comments = settings_reference.field_comments(settings.Settings)
    assert [name for name, comment in comments.items() if not comment.text] == []
    assert set(comments) == {field.name for field in dataclasses.fields(settings.Settings)}


def test_every_variable_from_env_reads_is_on_the_page() -> None:
    page = PAGE.read_text(encoding="utf-8")
    given = settings_reference.reads(settings, settings.Settings)
    variables = [given.variables(name, name)[0] for name in given.keywords]
    assert len(set(variables)) == len(variables)
    assert [v for v in variables if f"| `{v}` |" not in page] == []


@dataclasses.dataclass(frozen=True)
class _Sample:
    # --- first ---
    # -- described,
    #    on two lines.
    described: int = 1
    undescribed: int = 2


def test_a_field_without_a_comment_is_found() -> None:
    comments = settings_reference.field_comments(_Sample)
    assert comments["described"] == settings_reference.Comment("first", "described, on two lines.")
    assert comments["undescribed"] == settings_reference.Comment("first", None)


def test_a_field_without_a_comment_stops_the_page() -> None:
    with pytest.raises(
        settings_reference.UndocumentedSetting, match=r"_Sample.undescribed \(X_UNDESCRIBED\)"
    ):
        settings_reference.documented_row(["X_UNDESCRIBED"], 2, None, "_Sample.undescribed")


SAMPLE_FROM_ENV = """
def from_env(env):
    grant_raw = env.get(ENV_PREFIX + "GRANT_USD")
    grant = parse(grant_raw) if grant_raw else 5
    new_name = env.get(ENV_PREFIX + "API_PORT")
    return Sample(
        api_port=_port(env, "API_PORT", 1) if new_name else _port(env, "HTTP_PORT", 1),
        url=env.get("DATABASE_URL", ""),
        grant=grant,
        copied=settings.database_url,
    )
"""


def test_the_variable_is_found_however_from_env_reads_it() -> None:
    given = settings_reference.reads_source(SAMPLE_FROM_ENV, "Sample", "X_")
    assert given.variables("api_port", "api_port") == ["X_API_PORT", "X_HTTP_PORT"]
    assert given.variables("url", "url") == ["DATABASE_URL"]
    assert given.variables("grant", "grant") == ["X_GRANT_USD"]
    assert given.copied("copied") == "database_url"
    assert given.copied("url") is None


def test_an_older_name_read_as_well_is_shown_beside_the_setting() -> None:
    row = settings_reference.documented_row(
        ["X_API_PORT", "X_HTTP_PORT"], 8081, settings_reference.Comment("", "the API port."), "api_port"
    )
    assert row == settings_reference.Row("`X_API_PORT` (also read: `X_HTTP_PORT`)", "`8081`", "the API port.")

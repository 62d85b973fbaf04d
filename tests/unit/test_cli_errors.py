"""Every failure a person can fix ends `billingproxy` with one line on stderr and status 2;
a bug still raises (a traceback a developer needs)."""

from __future__ import annotations

import argparse
import errno

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from authz_sidecar import envoy_config, server
from billing import database, errors, pricing, settings
from billingproxy import admin_commands, cli

FIXABLE = {
    "a command": cli.CommandError("no backend: set BILLINGPROXY_BACKEND_URL"),
    "an admin command": admin_commands.AdminError("no wallet matches 'x'"),
    "a setting": settings.SettingsError("BILLINGPROXY_ADMISSION must be strict or overdraft"),
    "a price file": pricing.PricingError("prices.yaml: not a mapping"),
    "a database URL": database.DatabaseUrlError("DATABASE_URL must start with postgresql://"),
    "an Envoy config": envoy_config.EnvoyRenderError("backend URL must be http(s)://host"),
    "a sidecar port": server.ListenError("127.0.0.1:9002", "Address already in use", listener="the Check"),
}


def failing(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def dispatch(args: argparse.Namespace, settings: settings.Settings) -> int:
        raise exc

    monkeypatch.setattr(cli, "_dispatch", dispatch)


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("billingproxy: ")
    return line


@pytest.mark.parametrize("exc", FIXABLE.values(), ids=FIXABLE.keys())
def test_what_a_person_fixes_is_one_line_and_status_2(
    exc: errors.UserFacingError, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert isinstance(exc, errors.UserFacingError)
    failing(monkeypatch, exc)
    assert cli.main(["migrate"]) == cli.EXIT_USAGE
    assert one_line(capsys) == f"billingproxy: {exc}"


def test_a_taken_port_of_the_sidecar_says_which_and_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = server.ListenError("127.0.0.1:9002", "Address already in use", listener="the Check")
    assert isinstance(taken, OSError)
    failing(monkeypatch, taken)
    assert cli.main(["sidecar"]) == cli.EXIT_USAGE
    assert one_line(capsys) == (
        "billingproxy: cannot listen for the Check on 127.0.0.1:9002: Address already in use; "
        "stop the other process or choose another port (docs/configuration.md)"
    )


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        asyncpg.InvalidPasswordError("password authentication failed for user u"),
        sa_exc.OperationalError("SELECT 1", None, Exception("server closed the connection")),
    ],
    ids=["refused", "wrong password", "SQLAlchemy"],
)
def test_an_unreachable_database_is_one_line(
    exc: BaseException, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failing(monkeypatch, exc)
    assert cli.main(["migrate"]) == cli.EXIT_USAGE
    assert "cannot reach the database" in one_line(capsys)


def test_another_taken_port_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failing(monkeypatch, OSError(errno.EADDRINUSE, "Address already in use"))
    assert cli.main(["operator"]) == cli.EXIT_USAGE
    assert "another process uses the port" in one_line(capsys)


@pytest.mark.parametrize(
    "exc",
    [ValueError("bug"), FileNotFoundError(errno.ENOENT, "No such file or directory", "prices.yaml")],
    ids=["a bug", "a file error"],
)
def test_a_bug_still_raises(exc: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    failing(monkeypatch, exc)
    with pytest.raises(type(exc)):
        cli.main(["migrate"])


def test_a_bad_log_level_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BILLINGPROXY_LOG_LEVEL", "LOUD")
    assert cli.main(["migrate"]) == cli.EXIT_USAGE
    assert "BILLINGPROXY_LOG_LEVEL" in one_line(capsys)

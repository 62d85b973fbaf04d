"""`billingproxy probe`: the exec probes and the preStop drain, against stand-ins of the sidecar's
admin port (loopback TCP) and Envoy's admin (a Unix socket) that answer as the real ones do."""

from __future__ import annotations

import contextlib
import http.server
import json
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from billing import settings as settings_mod
from billingproxy import cli, probe

Answer = Callable[[str, str], tuple[int, str]]


def _handler(answer: Answer, seen: list[str]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self) -> None:
            seen.append(f"{self.command} {self.path}")
            status, body = answer(self.command, self.path)
            data = body.encode()
            self.send_response(status)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply  # noqa: N815 (http.server's names)

        def log_message(self, *args: object) -> None:
            pass

        def address_string(self) -> str:
            return "local"

    return Handler


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TcpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def sidecar_admin(answer: Answer) -> Iterator[settings_mod.Settings]:
    server = _TcpServer((settings_mod.INTERNAL_HOST, 0), _handler(answer, []))
    with _serving(server):
        yield settings_mod.Settings(admin_port=server.server_address[1])


@contextlib.contextmanager
def envoy_admin(tmp_path: Path, answer: Answer) -> Iterator[tuple[settings_mod.Settings, list[str]]]:
    settings = settings_mod.Settings(data_dir=tmp_path)
    path = settings.envoy_admin_socket
    path.parent.mkdir(parents=True)
    seen: list[str] = []
    server = _UnixServer(str(path), _handler(answer, seen))
    with _serving(server):
        yield settings, seen


def _stats(**values: int) -> str:
    return json.dumps({"stats": [{"name": name, "value": value} for name, value in values.items()]})


def test_healthz_and_readyz_pass_on_200() -> None:
    with sidecar_admin(lambda method, path: (200, '{"status": "ok"}')) as settings:
        probe.run(settings, ["healthz", "readyz"])


def test_readyz_fails_naming_what_the_sidecar_answered() -> None:
    def answer(method: str, path: str) -> tuple[int, str]:
        return (
            (200, "{}") if path == "/healthz" else (503, '{"status": "unavailable", "database": "OSError"}')
        )

    with sidecar_admin(answer) as settings:
        probe.run(settings, ["healthz"])
        with pytest.raises(probe.ProbeFailed, match=r"/readyz answered 503: .*database"):
            probe.run(settings, ["readyz"])


def test_a_sidecar_that_does_not_listen_fails_the_probe() -> None:
    with sidecar_admin(lambda method, path: (200, "")) as settings:
        pass  # closed again: nothing listens on that port now
    with pytest.raises(probe.ProbeFailed, match="ConnectionRefusedError"):
        probe.run(settings, ["healthz"])


@pytest.mark.parametrize(("body", "ready"), [("LIVE\n", True), ("PRE_INITIALIZING\n", False)])
def test_envoy_ready_asks_the_admin_socket(tmp_path: Path, body: str, ready: bool) -> None:
    status = 200 if ready else 503
    with envoy_admin(tmp_path, lambda method, path: (status, body)) as (settings, seen):
        if ready:
            probe.run(settings, ["envoy-ready"])
        else:
            with pytest.raises(probe.ProbeFailed, match="PRE_INITIALIZING"):
                probe.run(settings, ["envoy-ready"])
    assert seen == ["GET /ready"]


def test_the_command_exits_1_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BILLINGPROXY_DATA_DIR", str(tmp_path))
    assert cli.main(["probe", "envoy-ready"]) == cli.EXIT_PROBE_FAILED
    err = capsys.readouterr().err
    assert err.startswith("billingproxy probe: envoy admin /ready: FileNotFoundError")
    assert err.count("\n") == 1


def _listener_stats(stopped: int) -> str:
    return _stats(
        **{"listener_manager.total_listeners_active": 2, "listener_manager.listener_stopped": stopped}
    )


def test_drain_waits_for_the_listeners_to_stop_then_for_requests_then_for_the_access_log(
    tmp_path: Path,
) -> None:
    polls = {"listeners": 0, "active": 0, "flush": 0}

    def answer(method: str, path: str) -> tuple[int, str]:
        if path.startswith("/drain_listeners"):
            return 200, "OK\n"
        if "listener_manager" in path:
            polls["listeners"] += 1
            # Envoy keeps accepting for its drain time, then stops its listeners, each counted.
            return 200, _listener_stats(stopped=min(polls["listeners"] - 1, 2))
        if "downstream_rq_active" in path:
            polls["active"] += 1
            # The admin's own request (this /stats) is always active, as in a real Envoy.
            active = {
                "http.admin.downstream_rq_active": 1,
                "http.gateway.downstream_rq_active": 3 - polls["active"],
            }
            return 200, _stats(**active)
        polls["flush"] += 1
        sent = min(polls["flush"], 5)
        prefix = "access_logs.grpc_access_log."
        return 200, _stats(**{prefix + "logs_written": 5, prefix + "grpc_entries_flushed": sent})

    with envoy_admin(tmp_path, answer) as (settings, seen):
        assert probe.drain(settings, within_s=10) == []
    assert seen[0] == "POST /drain_listeners?graceful"
    assert polls == {"listeners": 3, "active": 3, "flush": 5}
    # In that order: no request poll before the listeners stopped, no flush poll before the last
    # request ended.
    kinds = [
        "listeners" if "listener_manager" in line else "active" if "rq_active" in line else "flush"
        for line in seen[1:]
    ]
    assert kinds == ["listeners"] * 3 + ["active"] * 3 + ["flush"] * 5


@pytest.mark.parametrize(
    ("stopped", "active", "unfinished"),
    [(1, 0, "listeners still accepting after 0.3 s"), (2, 1, "requests still in flight after 0.3 s")],
)
def test_drain_says_what_did_not_finish_in_time(
    tmp_path: Path, stopped: int, active: int, unfinished: str
) -> None:
    def answer(method: str, path: str) -> tuple[int, str]:
        if path.startswith("/drain_listeners"):
            return 200, "OK\n"
        if "listener_manager" in path:
            return 200, _listener_stats(stopped)
        if "downstream_rq_active" in path:
            return 200, _stats(**{"http.ingress_http.downstream_rq_active": active})
        return 200, _stats(**{"access_logs.grpc_access_log.logs_written": 2})

    with envoy_admin(tmp_path, answer) as (settings, _):
        assert probe.drain(settings, within_s=0.3) == [
            unfinished,
            f"access-log entries still unsent after {probe.ACCESS_LOG_FLUSH_TIMEOUT_S:g} s",
        ]


@pytest.mark.parametrize(
    ("stats", "stopped"),
    [
        ({}, False),
        ({"listener_manager.total_listeners_active": 2}, False),
        ({"listener_manager.total_listeners_active": 2, "listener_manager.listener_stopped": 1}, False),
        ({"listener_manager.total_listeners_active": 2, "listener_manager.listener_stopped": 2}, True),
    ],
)
def test_listeners_stopped_when_envoy_stopped_every_listener_it_has(
    stats: dict[str, int], stopped: bool
) -> None:
    assert probe.listeners_stopped(stats) is stopped


@pytest.mark.parametrize(
    ("stats", "flushed"),
    [
        ({}, True),
        ({"logs_written": 3, "grpc_entries_flushed": 3}, True),
        (
            {"logs_written": 3, "grpc_entries_flushed": 1, "grpc_entries_flush_failed": 1, "logs_dropped": 1},
            True,
        ),
        ({"logs_written": 3, "grpc_entries_flushed": 2}, False),
    ],
)
def test_access_log_flushed_when_every_entry_written_was_sent_failed_or_dropped(
    stats: dict[str, int], flushed: bool
) -> None:
    assert probe.access_log_flushed(stats) is flushed

"""`billingproxy probe`: ask the sidecar and Envoy, from inside the pod, whether they are well.

Why a command: the sidecar's listeners bind to loopback whatever the settings say, and Envoy's
admin is a Unix socket (mode 0600), so kubelet's ``httpGet`` cannot reach either; an ``exec``
probe in the pod can (docs/decisions/0022-exec-probes.md). ``drain`` is the gateway pod's
``preStop``: Envoy stops taking requests (after its drain time, while the Service stops sending
them), finishes those in flight, and sends every buffered access-log entry while the sidecar is
still there to settle it
(docs/decisions/0025-pod-shutdown-drains-and-flushes.md).

Sharp edges:
- Only the standard library (and the settings): a probe is a process start every few seconds.
  Envoy's admin socket is ``settings.envoy_admin_socket``, as for the config that puts it there;
  ``authz_sidecar.envoy_config`` is not imported, since it brings the database layer with it.
- Every call has a timeout well below kubelet's probe timeout, so a hung listener is a failed
  probe with a message, not a probe kubelet kills without one.
- Envoy's access-log counters are its own; the rule that they balance lives here, once, and the
  local stack's Envoy uses it too.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

from billing import settings as settings_mod

REQUEST_TIMEOUT_S = 2.0
DRAIN_POLL_S = 0.1
ACCESS_LOG_FLUSH_TIMEOUT_S = 2.0
#: Envoy's stats that say whether its gRPC access log still buffers entries (``/stats`` filter).
ACCESS_LOG_STATS_FILTER = r"^access_logs\.grpc_access_log\."
#: Envoy's stats that say whether its listeners were stopped (:func:`listeners_stopped`).
LISTENER_STATS_FILTER = r"^listener_manager\.(listener_stopped|total_listeners_active)$"
#: Envoy's stats of its admin interface's own HTTP traffic.
ADMIN_STATS_PREFIX = "http.admin."
_ACCESS_LOG_SENT = ("grpc_entries_flushed", "grpc_entries_flush_failed", "logs_dropped")


class ProbeFailed(Exception):
    """A part did not answer as a healthy one does; the message says which and what it answered."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("envoy-admin", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _request(connection: http.client.HTTPConnection, method: str, path: str, what: str) -> tuple[int, str]:
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        raise ProbeFailed(f"{what}: {type(exc).__name__}: {exc}") from None
    finally:
        connection.close()


def _sidecar(settings: settings_mod.Settings, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection(
        settings_mod.INTERNAL_HOST, settings.admin_port, timeout=REQUEST_TIMEOUT_S
    )
    return _request(connection, "GET", path, f"sidecar {path}")


def envoy_admin(socket_path: Path, method: str, path: str) -> tuple[int, str]:
    """``method path`` on Envoy's admin, over its Unix socket: the status and the body."""
    return _request(_UnixConnection(socket_path, REQUEST_TIMEOUT_S), method, path, f"envoy admin {path}")


def healthz(settings: settings_mod.Settings) -> None:
    status, body = _sidecar(settings, "/healthz")
    if status != 200:
        raise ProbeFailed(f"sidecar /healthz answered {status}: {body[:200]}")


def readyz(settings: settings_mod.Settings) -> None:
    status, body = _sidecar(settings, "/readyz")
    if status != 200:
        raise ProbeFailed(f"sidecar /readyz answered {status}: {body[:200]}")


def envoy_ready(settings: settings_mod.Settings) -> None:
    status, body = envoy_admin(settings.envoy_admin_socket, "GET", "/ready")
    if status != 200 or body.strip() != "LIVE":
        raise ProbeFailed(f"envoy /ready answered {status}: {body.strip()[:200]}")


_CHECKS: Mapping[str, Callable[[settings_mod.Settings], None]] = {
    "healthz": healthz,
    "readyz": readyz,
    "envoy-ready": envoy_ready,
}
CHECKS = tuple(_CHECKS)


def run(settings: settings_mod.Settings, checks: list[str]) -> None:
    """Run the named checks in order; the first that fails raises :class:`ProbeFailed`."""
    for name in checks:
        _CHECKS[name](settings)


def access_log_flushed(stats: Mapping[str, int]) -> bool:
    """Whether every gRPC access-log entry Envoy wrote was sent, failed or dropped (nothing is left
    in its buffer), from the counters under :data:`ACCESS_LOG_STATS_FILTER` by their last name."""
    return sum(stats.get(name, 0) for name in _ACCESS_LOG_SENT) >= stats.get("logs_written", 0)


def _stats(socket_path: Path, name_filter: str) -> dict[str, int]:
    query = urllib.parse.urlencode({"format": "json", "filter": name_filter})
    status, body = envoy_admin(socket_path, "GET", f"/stats?{query}")
    if status != 200:
        raise ProbeFailed(f"envoy /stats answered {status}")
    try:
        entries = json.loads(body)["stats"]
    except (ValueError, KeyError) as exc:
        raise ProbeFailed(f"envoy /stats answered something else than its JSON: {exc}") from None
    return {entry["name"]: int(entry.get("value", 0)) for entry in entries if "name" in entry}


def _wait(done: Callable[[], bool], deadline: float) -> bool:
    """Poll ``done`` until it is true (True) or ``deadline`` (``time.monotonic()``) passes (False)."""
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(DRAIN_POLL_S)
    return True


def listeners_stopped(stats: Mapping[str, int]) -> bool:
    """Whether Envoy has stopped every listener it has (they refuse new connections), from the
    counters under :data:`LISTENER_STATS_FILTER`. ``/drain_listeners?graceful`` keeps them
    accepting for Envoy's ``--drain-time-s``, then stops them all and counts each in
    ``listener_stopped``; ``total_listeners_active`` still counts the stopped ones."""
    active = stats.get("listener_manager.total_listeners_active", 0)
    return active > 0 and stats.get("listener_manager.listener_stopped", 0) >= active


def drain(settings: settings_mod.Settings, within_s: float) -> list[str]:
    """Drain Envoy: within ``within_s`` its listeners stop (after Envoy's ``--drain-time-s``, during
    which it still accepts requests) and the requests in flight end; then, within
    :data:`ACCESS_LOG_FLUSH_TIMEOUT_S`, its access log sends every entry. Returns what did not
    finish in time (empty when everything did).

    Every listener is drained, not only ``inboundonly`` ones: Envoy counts as inbound only the
    listeners that declare ``traffic_direction: INBOUND``, which the rendered configuration's do
    not, so an ``inboundonly`` drain left the gateway port open until SIGTERM."""
    socket_path = settings.envoy_admin_socket
    status, body = envoy_admin(socket_path, "POST", "/drain_listeners?graceful")
    if status != 200:
        raise ProbeFailed(f"envoy /drain_listeners answered {status}: {body.strip()[:200]}")
    deadline = time.monotonic() + within_s
    unfinished = []

    def stopped() -> bool:
        return listeners_stopped(_stats(socket_path, LISTENER_STATS_FILTER))

    def idle() -> bool:
        active = _stats(socket_path, r"^http\..*\.downstream_rq_active$")
        # The admin's own connection manager counts the very /stats request that asks.
        return sum(value for name, value in active.items() if not name.startswith(ADMIN_STATS_PREFIX)) == 0

    if not _wait(stopped, deadline):
        unfinished.append(f"listeners still accepting after {within_s:g} s")
    elif not _wait(idle, deadline):
        unfinished.append(f"requests still in flight after {within_s:g} s")

    def flushed() -> bool:
        stats = _stats(socket_path, ACCESS_LOG_STATS_FILTER)
        return access_log_flushed({name.rsplit(".", 1)[-1]: value for name, value in stats.items()})

    if not _wait(flushed, time.monotonic() + ACCESS_LOG_FLUSH_TIMEOUT_S):
        unfinished.append(f"access-log entries still unsent after {ACCESS_LOG_FLUSH_TIMEOUT_S:g} s")
    return unfinished

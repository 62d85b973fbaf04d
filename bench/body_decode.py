"""Micro-benchmark: what the Check does with a request before it touches the database.

Envoy's ext_authz ``http_service`` sends the sidecar an HTTP/1.1 request per client request
(``authz_sidecar/check_http.py``): the client's method, ``/check`` + its path, a few headers
(host, content-length, authorization, x-request-id, content-type, and Envoy's own
``x-envoy-*``) and the buffered body. Per request the sidecar parses it with ``httptools``
(the real ``CheckConnection`` callbacks: method, path, a dict of the headers, the body),
``json.loads`` the body to read ``model`` and ``max_tokens``, and on admission builds the 200
answer whose ``x-billingproxy-*`` headers Envoy turns into dynamic metadata
(``CheckServer._admission``). Both are the sidecar's own code, called here without a socket.
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable
from typing import Any

import httptools

from authz_sidecar import check_http, contract
from bench import workload
from billing import key_format, wallets
from billing.settings import Settings

REQUEST_ID = "7f1c2d3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f"


def sample_check_request() -> bytes:
    """The request Envoy sends the Check for the benchmark's chat request (headers as captured
    from Envoy with this repository's ext_authz configuration)."""
    headers = {
        "host": "127.0.0.1:8080",
        "content-length": str(len(workload.BODY)),
        "authorization": "Bearer sk-litellm-" + "A" * 32 + "0AbC12",
        "x-envoy-auth-partial-body": "false",
        "content-type": "application/json",
        "x-request-id": REQUEST_ID,
        "x-envoy-internal": "true",
        "x-envoy-expected-rq-timeout-ms": str(Settings().check_timeout_ms),
    }
    head = f"POST {contract.CHECK_PATH_PREFIX}{workload.PATH} HTTP/1.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    return head.encode("latin-1") + workload.BODY


class _Parsing(check_http.CheckConnection):
    """The sidecar's connection protocol, parsing only: complete requests stay in its queue."""

    def _answer_soon(self) -> None:
        pass


# Each function is timed in batches of about this many seconds, best of REPEATS batches.
TARGET_S = 0.25
REPEATS = 5


def _time_us(fn: Callable[[], object], *, target_s: float, repeats: int = REPEATS) -> float:
    """Best-of-``repeats`` time of one call, in µs (best of: least disturbed by other work)."""
    timer = timeit.Timer(fn)
    if target_s >= 0.2:
        number, _ = timer.autorange()  # calls that take 0.2 s at least
        number = max(number, int(number * target_s / 0.2))
    else:
        number = 1
        while timer.timeit(number) < target_s:
            number *= 2
    return min(timer.repeat(repeat=repeats, number=number)) / number * 1e6


def run(target_s: float = TARGET_S) -> dict[str, Any]:
    """The timings, each in batches of about ``target_s`` (a smoke run passes a tiny one)."""
    data = sample_check_request()
    # The decider is not reached: only parsing and building the answer are measured.
    server = check_http.CheckServer(
        decider=None,  # type: ignore[arg-type]  # never reached (see above)
        body_bytes_max=Settings().request_body_bytes_max,
    )
    connection = _Parsing(server)  # one connection, many requests: Envoy's keep-alive pool

    def parse() -> tuple[str, str, dict[str, str], bytes, bool]:
        connection.data_received(data)
        return connection._queue.popleft()  # type: ignore[return-value]  # bytes only for a refused request

    method, path, headers, body, _ = parse()
    assert (method, path, len(body)) == ("POST", workload.PATH, len(workload.BODY)), (method, path, len(body))
    assert headers["x-request-id"] == REQUEST_ID, headers

    def json_only() -> object:
        return json.loads(body)

    def check_input() -> object:
        # What the Check does before it touches the database (check_http.py, check.Decider).
        _, _, headers, body, _ = parse()
        request = json.loads(body)
        return (
            headers.get("authorization"),
            headers.get("x-request-id"),
            request.get("model"),
            request.get("max_tokens"),
        )

    metadata = {
        "wallet_id": key_format.random_id(wallets.WALLET_ID_PREFIX),
        "key_id": key_format.random_id(key_format.ID_PREFIX),
        "hold_id": REQUEST_ID,
        "model": workload.MODEL,
    }

    def admit_response() -> bytes:
        # As check.Decider.decide hands the facts over, then the 200 with its headers.
        return server._admission(
            {contract.metadata_header(k): contract.metadata_value(v) for k, v in metadata.items()}
        )

    return {
        "parser": f"httptools {httptools.__version__}",
        "http_request_bytes": len(data),
        "body_bytes": len(workload.BODY),
        "parse_us": round(_time_us(parse, target_s=target_s), 2),
        "json_loads_us": round(_time_us(json_only, target_s=target_s), 2),
        "check_input_total_us": round(_time_us(check_input, target_s=target_s), 2),
        "admit_response_bytes": len(admit_response()),
        "admit_response_us": round(_time_us(admit_response, target_s=target_s), 2),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))

"""authz_sidecar.access_log: what settlement reads from an access-log entry — a line of Envoy's
JSON access log (`billingproxy reconcile`) or a gRPC entry (the sidecar) — and what it refuses to
guess: the usage is billing.usage.read of the Lua filter's metadata, by the format the Check gave."""

from __future__ import annotations

import json
import logging

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2

from authz_sidecar.access_log import FinishedRequest, finished_request, finished_request_from_json
from billing.usage import Usage

HOLD = {
    "x-billingproxy-hold-id": "r1",
    "x-billingproxy-wallet-id": "wal_1",
    "x-billingproxy-key-id": "key_1",
    "x-billingproxy-model": "gemini%2Fgemini-2.5-flash",
    "x-billingproxy-format": "openai_chat",
}
CHAT_USAGE = json.dumps(
    {
        "prompt_tokens": 7,
        "completion_tokens": 5,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
)


def line(**changes):
    base = {
        "request_id": "r1",
        "status": 200,
        "authz": dict(HOLD),
        "usage": {"usage": CHAT_USAGE, "finished": True},
    }
    return {**base, **changes}


def test_a_billed_request_with_its_usage() -> None:
    assert finished_request_from_json(line()) == FinishedRequest(
        request_id="r1",
        status=200,
        model="gemini/gemini-2.5-flash",
        usage=Usage(input_text=5, input_cached=2, output_text=5),
        wallet_id="wal_1",
    )


def test_an_anthropic_stream_is_read_from_both_of_its_usage_objects() -> None:
    authz = {**HOLD, "x-billingproxy-format": "anthropic_messages"}
    usage = {
        "usage_start": '{"input_tokens": 25, "cache_read_input_tokens": 5, "output_tokens": 1}',
        "usage": '{"output_tokens": 15}',
        "finished": True,
    }
    done = finished_request_from_json(line(authz=authz, usage=usage))
    assert done is not None and done.usage == Usage(input_text=25, input_cached=5, output_text=15)


@pytest.mark.parametrize(
    "usage",
    [
        {"usage": CHAT_USAGE},  # never finished (the client hung up)
        {"usage": CHAT_USAGE, "finished": False},
        {"usage": CHAT_USAGE, "finished": "true"},  # not Envoy's shape
        {"finished": True},  # finished without a usage object
        {"usage": '{"prompt_tokens": "many", "completion_tokens": 1}', "finished": True},
        {"usage": "", "finished": True},  # larger than the filter keeps
        {
            "prompt_tokens": 7,
            "completion_tokens": 5,
            "cached_tokens": 0,
            "usage_seen": True,
        },  # the old counts
        None,  # the filter published nothing
    ],
    ids=[
        "unfinished",
        "finished-false",
        "finished-text",
        "no-usage",
        "bad-count",
        "too-large",
        "old-shape",
        "none",
    ],
)
def test_usage_that_cannot_be_charged_exactly_leaves_the_hold_to_the_settler(usage) -> None:
    done = finished_request_from_json(line(usage=usage))
    assert done is not None and done.usage is None


@pytest.mark.parametrize("usage_format", [None, "bogus", "openai_embeddings"])
def test_usage_is_read_only_in_the_format_the_check_gave(usage_format) -> None:
    authz = {k: v for k, v in HOLD.items() if k != "x-billingproxy-format"}
    if usage_format is not None:
        authz["x-billingproxy-format"] = usage_format
    done = finished_request_from_json(line(authz=authz))
    assert done is not None and done.usage is None  # chat usage is not an embeddings usage


def test_a_finished_answer_with_unreadable_usage_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="authz_sidecar.access_log"):
        finished_request_from_json(line(usage={"usage": '{"prompt_tokens": -1}', "finished": True}))
    assert "r1 is charged its hold" in caplog.text


def test_a_check_envoy_gave_up_on_is_voided_by_request_id() -> None:
    assert finished_request_from_json(line(status=503, authz=None)) == FinishedRequest(
        "r1", 503, "", None, check_failed=True
    )


@pytest.mark.parametrize(
    "record",
    [
        line(authz=None),  # a sidecar route or a denial: no hold
        line(authz={"ext_authz_duration": 1}),  # a Check without a hold (GET /v1/models)
        line(status="200"),  # not Envoy's shape
        line(status=True),
        {"time": "2026-11-25T11:41:10Z"},
    ],
    ids=["no-authz", "no-hold", "status-text", "status-bool", "other"],
)
def test_lines_with_nothing_to_settle(record) -> None:
    assert finished_request_from_json(record) is None


def test_the_grpc_entry_reads_the_same_facts() -> None:
    """The gRPC entry's Struct values (strings, a bool) read exactly as the JSON line's."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    metadata = entry.common_properties.metadata.filter_metadata
    metadata["envoy.filters.http.ext_authz"].update(HOLD)
    metadata["billingproxy.usage"].update({"usage": CHAT_USAGE, "finished": True})
    entry.request.request_id = "r1"
    entry.response.response_code.value = 200
    assert finished_request(entry) == finished_request_from_json(line())
    metadata["billingproxy.usage"].update({"finished": False})
    assert finished_request(entry).usage is None


@pytest.mark.parametrize(
    ("changes", "cut"),
    [
        (
            {"status": 0, "upstream": "127.0.0.1:4000", "usage": None},
            True,
        ),  # the client left before the answer
        ({"status": 504, "flags": "UT", "upstream": "127.0.0.1:4000", "usage": None}, True),  # Envoy gave up
        ({"status": 504, "flags": "DC,UT", "upstream": "127.0.0.1:4000", "usage": None}, True),
        ({"status": 408, "flags": "SI", "upstream": "127.0.0.1:4000", "usage": None}, True),  # idle timeout
        ({"status": 0, "upstream": "-", "usage": None}, False),  # the backend was never reached
        ({"status": 503, "flags": "UF", "upstream": "-", "usage": None}, False),
        ({"status": 500, "upstream": "127.0.0.1:4000", "usage": None}, False),  # the backend's own error
    ],
)
def test_an_answer_the_backend_was_asked_for_but_never_gave_is_cut(changes: dict, cut: bool) -> None:
    """Cut answers are charged the hold (the provider bills the work); only the backend's own
    errors and requests that never reached it are voided (docs/decisions/0001, amendment 11)."""
    done = finished_request_from_json(line(**changes))
    assert done is not None and done.cut is cut


def test_a_grpc_entry_is_cut_when_the_backend_was_reached_and_nothing_came_back() -> None:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_id = "r1"
    entry.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(HOLD)
    assert finished_request(entry) is not None and not finished_request(entry).cut  # never reached
    entry.common_properties.upstream_remote_address.socket_address.address = "127.0.0.1"
    assert finished_request(entry).cut  # reached, status 0
    entry.response.response_code.value = 504
    assert not finished_request(entry).cut
    entry.common_properties.response_flags.upstream_request_timeout = True
    assert finished_request(entry).cut
    entry.common_properties.response_flags.upstream_request_timeout = False
    entry.response.response_code.value = 408
    assert not finished_request(entry).cut
    entry.common_properties.response_flags.stream_idle_timeout = True
    assert finished_request(entry).cut

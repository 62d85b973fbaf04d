"""Lines of Envoy's JSON access log, as the rendered config writes them, for tests that feed the
sidecar's file follower or ``billingproxy reconcile`` without an Envoy."""

from __future__ import annotations

import json


def envoy_log_line(
    request_id: str, status: int, *, hold: dict[str, str] | None, prompt: int = 0, completion: int = 0
) -> str:
    """A line of Envoy's JSON access log, as the rendered config writes it (envoy_config
    ``_file_access_log``; this shape was copied from a real `billingproxy up` log)."""
    authz = None
    if hold is not None:
        authz = {
            "ext_authz_duration": 1,
            "x-billingproxy-format": "openai_chat",
            **{f"x-billingproxy-{k}": v for k, v in hold.items()},
        }
    return json.dumps(
        {
            "authz": authz,
            "bytes_received": 84,
            "bytes_sent": 512,
            "details": "via_upstream",
            "duration_ms": 4,
            "flags": "-",
            "method": "POST",
            "path": "/v1/chat/completions",
            "request_id": request_id,
            "status": status,
            "time": "2026-11-25T11:41:10.282Z",
            "upstream": "127.0.0.1:46179",
            "usage": {
                "usage": json.dumps({"prompt_tokens": prompt, "completion_tokens": completion}),
                "finished": hold is not None and status == 200,
            },
        }
    )

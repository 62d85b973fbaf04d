"""The local stack's port picks: a helper's port is never one the stack's settings name."""

from __future__ import annotations

import pytest

from billing import settings as settings_mod
from billingproxy.devstack import local_stack


def test_a_helpers_port_is_never_a_port_the_settings_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test picks the gateway's port, still free, before `up` starts; `up` then draws the demo
    backend's port at random. Drawing the gateway's number made Envoy fail to bind."""
    settings = settings_mod.Settings(gateway_port=12_345, api_port=12_346)
    draws = iter([12_345, 12_346, 12_347])
    monkeypatch.setattr(local_stack.random, "randint", lambda _low, _high: next(draws))
    monkeypatch.setattr(local_stack, "_handed_out", set())
    monkeypatch.setattr(local_stack, "_ephemeral_low", lambda: 32_768)

    local_stack.reserve_setting_ports(settings)

    assert local_stack.free_port() == 12_347

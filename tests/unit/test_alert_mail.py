"""billing.alert_mail: the SMTP URL is checked at start-up without ever repeating its password, the
mail says what happened and what to do and carries no secret, and no address or From can add a
header or a recipient."""

from __future__ import annotations

import pytest

from billing import alert_mail, money, settings as settings_mod
from billing.settings import SettingsError

PASSWORD = "s3cr3t-p@ss"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", ("smtp", "mail.example.com", 587, "", "")),
        ("smtps://u:p@mail.example.com", ("smtps", "mail.example.com", 465, "u", "p")),
        (
            "smtp://user%40x.com:p%3Aw@mail.example.com:2525",
            ("smtp", "mail.example.com", 2525, "user@x.com", "p:w"),
        ),
    ],
)
def test_smtp_urls(url: str, expected: tuple[str, str, int, str, str]) -> None:
    server = alert_mail.parse_smtp_url(url)
    assert (server.scheme, server.host, server.port, server.username, server.password) == expected
    assert "password" not in repr(server)
    assert server.where == f"{expected[0]}://{expected[1]}:{expected[2]}"


@pytest.mark.parametrize(
    "url",
    [
        f"http://u:{PASSWORD}@mail.example.com",
        f"smtp://u:{PASSWORD}@",
        f"smtp://u:{PASSWORD}@mail.example.com:99999",
        f"smtp://u:{PASSWORD}@mail.example.com/path",
        f"smtp://:{PASSWORD}@mail.example.com",
        "smtp://only-user@mail.example.com",
        "mail.example.com:587",
    ],
)
def test_a_bad_smtp_url_is_a_startup_error_that_never_shows_the_password(url: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_mod.from_env({"BILLINGPROXY_SMTP_URL": url, "BILLINGPROXY_SMTP_FROM": "a@example.com"})
    assert "BILLINGPROXY_SMTP_URL" in str(caught.value)
    assert PASSWORD not in str(caught.value) and PASSWORD not in repr(caught.value)


def test_settings_never_show_the_smtp_password() -> None:
    settings = settings_mod.from_env(
        {
            "BILLINGPROXY_SMTP_URL": f"smtps://u:{PASSWORD}@mail.example.com",
            "BILLINGPROXY_SMTP_FROM": "a@example.com",
        }
    )
    assert PASSWORD not in repr(settings)
    assert settings.smtp_server is not None and PASSWORD not in repr(settings.smtp_server)
    assert settings_mod.from_env({}).smtp_server is None


@pytest.mark.parametrize(
    "sender", ["", "not an address", "a@example.com\r\nBcc: x@example.org", "a@b.c, d@e.f"]
)
def test_smtp_from_is_required_and_one_address(sender: str) -> None:
    with pytest.raises(SettingsError, match="BILLINGPROXY_SMTP_FROM"):
        settings_mod.from_env(
            {"BILLINGPROXY_SMTP_URL": "smtp://mail.example.com", "BILLINGPROXY_SMTP_FROM": sender}
        )


def test_a_from_with_a_display_name_sends_from_its_address() -> None:
    assert alert_mail.check_sender("BillingProxy <alerts@example.com>") == "alerts@example.com"


def mail(event_type: str = "wallet.balance_low", **data: str) -> alert_mail.AlertMail:
    return alert_mail.AlertMail(
        event_id="evt_1",
        type=event_type,
        wallet_id="wal_1",
        balance_nano=money.NANO_PER_USD // 4,
        threshold_nano=money.NANO_PER_USD if event_type == "wallet.balance_low" else None,
        data=data,
    )


def test_the_mail_says_what_happened_and_where_to_top_up() -> None:
    msg = mail().message(
        sender="a@example.com", recipient="owner@example.com", public_url="https://gw.example.com"
    )
    assert msg["Subject"] == "[BillingProxy] Your balance is low"
    assert msg["To"] == "owner@example.com" and msg["Auto-Submitted"] == "auto-generated"
    body = msg.get_content()
    assert "$0.250000" in body and "$1.000000" in body and "https://gw.example.com/billing/topup" in body
    assert msg.get_content_type() == "text/plain"


def test_a_key_limit_mail_has_no_top_up_link_and_an_unknown_type_still_reads() -> None:
    body = mail("key.limit_reached", key_id="key_9").body("https://gw.example.com")
    assert "key id: key_9" in body and "/billing/topup" not in body
    assert mail("future.thing").subject() == "[BillingProxy] Billing alert: future.thing"


@pytest.mark.parametrize(
    "address",
    [
        "owner@example.com\r\nBcc: x@example.org",
        "owner@example.com\nX-Evil: 1",
        "a@example.com, b@example.org",
        "a@example.com;b@example.org",
        "<a@example.com>",
        "ü@example.com",
        "no-at-sign",
        "a@@example.com",
        "a" * 250 + "@example.com",
        "",
    ],
)
def test_no_address_adds_a_header_or_a_recipient(address: str) -> None:
    with pytest.raises(alert_mail.InvalidAddress):
        mail().message(sender="a@example.com", recipient=address, public_url="https://gw.example.com")


def test_a_data_value_with_a_line_break_stays_in_the_body() -> None:
    msg = mail("auto_recharge.failed", reason="declined\r\nBcc: x@example.org").message(
        sender="a@example.com", recipient="owner@example.com", public_url="https://gw.example.com"
    )
    assert msg["Bcc"] is None and set(msg.keys()) == {
        "From",
        "To",
        "Subject",
        "Message-ID",
        "Date",
        "Auto-Submitted",
        "Content-Type",
        "Content-Transfer-Encoding",
        "MIME-Version",
    }

"""Alerts by mail and as Kubernetes Events (docs/decisions/0036-alert-mail-and-events.md).

``alert_endpoints`` becomes what the sweep watches of a wallet, with or without a webhook: ``url``
and ``signing_secret`` are NULL together for a wallet watched only for its mail or its Kubernetes
Events. ``alert_deliveries`` tracks each event on each channel other than the webhook (whose
columns stay on ``alert_events``): one row per event and channel, so a failing webhook resends no
mail and a failing mail server reposts no webhook. ``alert_events_by_time`` serves the channels'
look for new events.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_now = sa.text("now()")


def upgrade() -> None:
    op.alter_column("alert_endpoints", "url", nullable=True)
    op.alter_column("alert_endpoints", "signing_secret", nullable=True)
    op.create_check_constraint(
        "alert_endpoints_webhook_whole",
        "alert_endpoints",
        "(url IS NULL) = (signing_secret IS NULL)",
    )
    op.create_index("alert_events_by_time", "alert_events", ["created_at"])
    op.create_table(
        "alert_deliveries",
        sa.Column("event_id", sa.Text, sa.ForeignKey("alert_events.id"), primary_key=True),
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("recipient", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("gave_up_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.CheckConstraint("channel IN ('mail', 'kubernetes')", name="alert_deliveries_channel_known"),
    )
    op.create_index(
        "alert_deliveries_due",
        "alert_deliveries",
        ["channel", "next_attempt_at"],
        postgresql_where=sa.text("delivered_at IS NULL AND gave_up_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("alert_deliveries")
    op.drop_index("alert_events_by_time", table_name="alert_events")
    op.drop_constraint("alert_endpoints_webhook_whole", "alert_endpoints")
    op.execute("DELETE FROM alert_endpoints WHERE url IS NULL")
    op.alter_column("alert_endpoints", "signing_secret", nullable=False)
    op.alter_column("alert_endpoints", "url", nullable=False)

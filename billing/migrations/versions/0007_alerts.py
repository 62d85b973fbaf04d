"""Low-balance alerts (docs/decisions/0033-low-balance-alerts.md): ``alert_endpoints``, the webhook
each wallet's owner registered and the balance the sweep last saw; ``alert_events``, the queue and
record of what is delivered.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_now = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "alert_endpoints",
        sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("signing_secret", sa.Text, nullable=False),
        sa.Column("thresholds_nano", pg.ARRAY(sa.BigInteger), nullable=True),
        sa.Column("low_default_nano", sa.BigInteger, nullable=False),
        sa.Column("observed_balance_nano", sa.BigInteger, nullable=False),
        sa.Column("observation", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.CheckConstraint("length(url) <= 2048", name="alert_endpoints_url_length"),
    )
    op.create_table(
        "alert_events",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("observation", sa.BigInteger, nullable=True),
        sa.Column("threshold_nano", sa.BigInteger, nullable=True),
        sa.Column("balance_nano", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("gave_up_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.UniqueConstraint(
            "wallet_id", "observation", "threshold_nano", "type", name="alert_events_one_per_crossing"
        ),
    )
    op.create_index("alert_events_by_wallet", "alert_events", ["wallet_id", "created_at"])
    op.create_index(
        "alert_events_due",
        "alert_events",
        ["next_attempt_at"],
        postgresql_where=sa.text("delivered_at IS NULL AND gave_up_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("alert_events")
    op.drop_table("alert_endpoints")

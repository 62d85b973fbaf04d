"""Alerts about more than the balance (docs/decisions/0033-low-balance-alerts.md).

``alert_events.data``: what an event of a type other than ``wallet.balance_low`` says (the
recharge's amount and outcome, the key that reached its limit), sent as the event's ``data``
beside the wallet and the balance. ``'{}'`` for the rows that exist, which need nothing more.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "alert_events",
        sa.Column("data", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )


def downgrade() -> None:
    op.drop_column("alert_events", "data")

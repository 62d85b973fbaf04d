"""Stripe top-ups: processed events, checkout sessions, payments, disputes; ``wallets.disputed``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

These tables hold the *facts* Stripe told us (see billing/payments.py); balances still move only
through ledger entries. ``wallets.disputed`` is the Check's second switch, set only by
billing/payments.py while the wallet has an open dispute, so it never shares an owner with
``wallets.suspended`` (the operator's and admins' switch).
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_now = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("object_id", sa.Text, nullable=True),
        sa.Column("livemode", sa.Boolean, nullable=False),
        sa.Column("stripe_created", sa.BigInteger, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("wallet_id", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=False, server_default=""),
    )
    op.create_table(
        "stripe_checkout_sessions",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
        sa.Column("amount_nano", sa.BigInteger, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="open"),
        sa.Column("payment_intent", sa.Text, nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.CheckConstraint(
            "status IN ('open', 'complete', 'expired')", name="stripe_checkout_sessions_status_known"
        ),
    )
    op.create_index("stripe_checkout_sessions_wallet", "stripe_checkout_sessions", ["wallet_id"])
    op.create_index(
        "stripe_checkout_sessions_open",
        "stripe_checkout_sessions",
        ["created_at"],
        postgresql_where=sa.text("status = 'open'"),
    )
    op.create_table(
        "stripe_payments",
        sa.Column("payment_intent", sa.Text, primary_key=True),
        sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=True),
        sa.Column("checkout_session", sa.Text, nullable=True),
        sa.Column("charge", sa.Text, nullable=True),
        sa.Column("amount_nano", sa.BigInteger, nullable=True),
        sa.Column("paid", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("refunded_nano", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("refund_applied_nano", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.CheckConstraint(
            "0 <= refund_applied_nano AND refund_applied_nano <= refunded_nano",
            name="stripe_payments_refunds_ordered",
        ),
    )
    op.create_index("stripe_payments_wallet", "stripe_payments", ["wallet_id"])
    op.create_table(
        "stripe_disputes",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("payment_intent", sa.Text, sa.ForeignKey("stripe_payments.payment_intent"), nullable=False),
        sa.Column("charge", sa.Text, nullable=True),
        sa.Column("amount_nano", sa.BigInteger, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("status_event_created", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.CheckConstraint("amount_nano >= 0", name="stripe_disputes_amount_not_negative"),
    )
    op.create_index("stripe_disputes_payment_intent", "stripe_disputes", ["payment_intent"])
    op.add_column("wallets", sa.Column("disputed", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("wallets", "disputed")
    op.drop_table("stripe_disputes")
    op.drop_table("stripe_payments")
    op.drop_table("stripe_checkout_sessions")
    op.drop_table("stripe_events")

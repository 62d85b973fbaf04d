"""Auto-recharge (docs/decisions/0034-auto-recharge.md).

``auto_recharges``, one row per wallet (the setting, the saved card, the Stripe Customer, the
failure count, and the lock the sweep takes before it starts a recharge); ``recharges``, one row per
off-session charge, keyed ``(wallet_id, seq)``, at most one in flight per wallet (a partial unique
index); ``recharge_setup_sessions``, the Checkout Sessions in setup mode the gateway created (what
makes a saved card's event *ours*).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_now = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "auto_recharges",
        sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), primary_key=True),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("threshold_nano", sa.BigInteger, nullable=False),
        sa.Column("amount_nano", sa.BigInteger, nullable=False),
        sa.Column("monthly_cap_nano", sa.BigInteger, nullable=True),
        sa.Column("stripe_customer_id", sa.Text, nullable=True),
        sa.Column("payment_method", sa.Text, nullable=True),
        sa.Column("card_brand", sa.Text, nullable=True),
        sa.Column("card_last4", sa.Text, nullable=True),
        sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("paused_reason", sa.Text, nullable=True),
        sa.Column("last_seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.CheckConstraint("threshold_nano >= 0", name="auto_recharges_threshold_not_negative"),
        sa.CheckConstraint("amount_nano > 0", name="auto_recharges_amount_positive"),
        sa.CheckConstraint(
            "monthly_cap_nano IS NULL OR monthly_cap_nano >= amount_nano",
            name="auto_recharges_cap_fits_one",
        ),
        sa.CheckConstraint("consecutive_failures >= 0", name="auto_recharges_failures_not_negative"),
    )
    op.create_table(
        "recharges",
        sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("amount_nano", sa.BigInteger, nullable=False),
        sa.Column("monthly_cap_nano", sa.BigInteger, nullable=True),
        sa.Column("customer", sa.Text, nullable=False),
        sa.Column("payment_method", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False, server_default="creating"),
        sa.Column("payment_intent", sa.Text, nullable=True, unique=True),
        sa.Column("failure_code", sa.Text, nullable=True),
        sa.Column("failure_message", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.CheckConstraint(
            "state IN ('creating', 'pending', 'succeeded', 'failed')", name="recharges_state_known"
        ),
        sa.CheckConstraint("amount_nano > 0", name="recharges_amount_positive"),
    )
    op.create_index(
        "recharges_one_in_flight",
        "recharges",
        ["wallet_id"],
        unique=True,
        postgresql_where=sa.text("state IN ('creating', 'pending')"),
    )
    op.create_index(
        "recharges_due",
        "recharges",
        ["next_attempt_at"],
        postgresql_where=sa.text("state = 'creating'"),
    )
    op.create_table(
        "recharge_setup_sessions",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
        sa.Column("customer", sa.Text, nullable=False),
        sa.Column("payment_method", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    )
    op.create_index("recharge_setup_sessions_wallet", "recharge_setup_sessions", ["wallet_id"])


def downgrade() -> None:
    op.drop_table("recharge_setup_sessions")
    op.drop_table("recharges")
    op.drop_table("auto_recharges")

"""Wallets, API keys, the immutable ledger and holds.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_now = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "wallets",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("email", sa.Text, nullable=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("external_id", sa.Text, nullable=True, unique=True),
        sa.Column("balance_nano", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reserved_nano", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("suspended", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.CheckConstraint("reserved_nano >= 0", name="wallets_reserved_not_negative"),
        sa.CheckConstraint("source IN ('signup', 'kubernetes', 'admin')", name="wallets_source_known"),
    )
    op.create_index(
        "wallets_signup_email_unique",
        "wallets",
        [sa.text("lower(email)")],
        unique=True,
        postgresql_where=sa.text("source = 'signup'"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
        sa.Column("key_hash", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("display_prefix", sa.Text, nullable=False),
        sa.Column("allowed_models", pg.ARRAY(sa.Text), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("suspended", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("external_id", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    )
    op.create_index("ix_api_keys_wallet_id", "api_keys", ["wallet_id"])
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=False, unique=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("amount_nano", sa.BigInteger, nullable=False),
        sa.Column("balance_after_nano", sa.BigInteger, nullable=False),
        sa.Column("details", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    )
    op.create_index("ledger_entries_wallet_newest", "ledger_entries", ["wallet_id", sa.text("id DESC")])
    # Money records are immutable: mistakes are corrected by new entries, never by edits.
    op.execute(
        """
        CREATE FUNCTION ledger_entries_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'ledger entries are immutable; post a correcting entry instead';
        END $$;
        """
    )
    op.execute(
        "CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries "
        "FOR EACH ROW EXECUTE FUNCTION ledger_entries_immutable()"
    )
    op.execute(
        "CREATE TRIGGER ledger_entries_not_truncated BEFORE TRUNCATE ON ledger_entries "
        "FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_immutable()"
    )
    op.create_table(
        "holds",
        sa.Column("request_id", sa.Text, primary_key=True),
        sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
        sa.Column("key_id", sa.Text, sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("amount_nano", sa.BigInteger, nullable=False),
        sa.Column("state", sa.Text, nullable=False, server_default="pending"),
        sa.Column("posted_nano", sa.BigInteger, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount_nano >= 0", name="holds_amount_not_negative"),
        sa.CheckConstraint("state IN ('pending', 'posted', 'voided', 'expired')", name="holds_state_known"),
    )
    op.create_index(
        "holds_pending_by_expiry",
        "holds",
        ["expires_at"],
        postgresql_where=sa.text("state = 'pending'"),
    )


def downgrade() -> None:
    op.drop_table("holds")
    op.execute("DROP TRIGGER ledger_entries_not_truncated ON ledger_entries")
    op.execute("DROP TRIGGER ledger_entries_immutable ON ledger_entries")
    op.execute("DROP FUNCTION ledger_entries_immutable()")
    op.drop_table("ledger_entries")
    op.drop_table("api_keys")
    op.drop_table("wallets")

"""The account page (docs/decisions/0037-account-page.md).

``account_sessions``: sign-in sessions, by the SHA-256 of their cookie's token.
``ledger_usage_by_wallet_time``: the spend chart's one aggregate query (a wallet's usage entries of
the last 30 days). Built CONCURRENTLY, outside the migration's transaction, as 0006 does: a plain
CREATE INDEX would stop every settlement while a large ledger is indexed.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "account_sessions",
        sa.Column("token_hash", sa.LargeBinary(32), primary_key=True),
        sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
        sa.Column("key_id", sa.Text, sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("csrf_token", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("account_sessions_expiry", "account_sessions", ["expires_at"])
    with op.get_context().autocommit_block():
        # An interrupted concurrent build leaves an invalid index behind: a re-run replaces it.
        op.drop_index(
            "ledger_usage_by_wallet_time",
            table_name="ledger_entries",
            postgresql_concurrently=True,
            if_exists=True,
        )
        op.create_index(
            "ledger_usage_by_wallet_time",
            "ledger_entries",
            ["wallet_id", "created_at"],
            postgresql_where=sa.text("kind = 'usage'"),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ledger_usage_by_wallet_time",
            table_name="ledger_entries",
            postgresql_concurrently=True,
            if_exists=True,
        )
    op.drop_table("account_sessions")

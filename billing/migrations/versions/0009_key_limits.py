"""Per-key spend limits (docs/decisions/0035-per-key-spend-limits.md).

On ``api_keys``: the limit (``limit_nano``, NULL: none), its window (``limit_window``), when the
window's count began (``window_start``), and two running sums the Check and the settlements keep,
as they keep the wallet's: ``spent_nano`` (posted in the window) and ``reserved_nano`` (the key's
pending holds that count against a limit). On ``holds``: ``limit_window_start``, the key's window
the hold counts in (NULL: its key had no limit when it was placed), so a settlement knows whether
to release the key's reservation and whether the charge belongs to the key's current window.

Every new column is NULL or has a constant default, so PostgreSQL adds it without rewriting
either table.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("limit_nano", sa.BigInteger, nullable=True))
    op.add_column("api_keys", sa.Column("limit_window", sa.Text, nullable=True))
    op.add_column("api_keys", sa.Column("window_start", sa.DateTime(timezone=True), nullable=True))
    op.add_column("api_keys", sa.Column("spent_nano", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("api_keys", sa.Column("reserved_nano", sa.BigInteger, nullable=False, server_default="0"))
    op.create_check_constraint("api_keys_limit_not_negative", "api_keys", "limit_nano >= 0")
    op.create_check_constraint(
        "api_keys_limit_window_known",
        "api_keys",
        "limit_window IN ('daily', 'weekly', 'monthly', 'total')",
    )
    op.create_check_constraint(
        "api_keys_limit_has_window", "api_keys", "(limit_nano IS NULL) = (limit_window IS NULL)"
    )
    op.create_check_constraint("api_keys_spent_not_negative", "api_keys", "spent_nano >= 0")
    op.create_check_constraint("api_keys_reserved_not_negative", "api_keys", "reserved_nano >= 0")
    op.add_column("holds", sa.Column("limit_window_start", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("holds", "limit_window_start")
    for name in (
        "api_keys_reserved_not_negative",
        "api_keys_spent_not_negative",
        "api_keys_limit_has_window",
        "api_keys_limit_window_known",
        "api_keys_limit_not_negative",
    ):
        op.drop_constraint(name, "api_keys", type_="check")
    for column in ("reserved_nano", "spent_nano", "window_start", "limit_window", "limit_nano"):
        op.drop_column("api_keys", column)

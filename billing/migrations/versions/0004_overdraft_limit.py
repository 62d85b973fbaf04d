"""A per-wallet overdraft limit: ``wallets.overdraft_limit_nano`` (docs/decisions/0004-overdraft-limit.md).

The Check admits a request only while ``balance − reserved − hold ≥ −overdraft_limit``
(billing/holds.py), so no wallet goes below −(its limit), however large one request or however
many run at once. NOT NULL and never negative (CHECK). Every wallet that exists when this runs
gets 0 — no overdraft, the safe choice: an operator raises it per wallet
(``billingproxy wallet set-overdraft``, a Wallet resource's ``spec.overdraftLimitUsd``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "wallets", sa.Column("overdraft_limit_nano", sa.BigInteger, nullable=False, server_default="0")
    )
    op.create_check_constraint("wallets_overdraft_limit_not_negative", "wallets", "overdraft_limit_nano >= 0")


def downgrade() -> None:
    op.drop_constraint("wallets_overdraft_limit_not_negative", "wallets", type_="check")
    op.drop_column("wallets", "overdraft_limit_nano")

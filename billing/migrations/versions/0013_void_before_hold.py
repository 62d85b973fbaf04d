"""A void that stands in a request id's place before any hold (billing/holds.py, void_before_hold).

The report of a Check Envoy gave up on (503, no metadata) names no wallet, key or model; when it
comes before the Check's hold, it leaves a ``voided`` hold of 0 in that request id's place, so the
Check's later insert meets the primary key and places nothing. ``wallet_id``, ``key_id`` and
``model`` may therefore be NULL, all three and only in such a void
(``holds_owned_or_void_before_hold``).

Dropping NOT NULL changes only the catalog. The CHECK is added NOT VALID (instant) and then
validated outside the migration's transaction: the scan runs under a lock that lets Checks and
settlements go on, not under the ALTERs' exclusive one.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# billing.tables.HOLDS_OWNED_OR_VOID_BEFORE_HOLD, as it is at this revision.
OWNED_OR_VOID_BEFORE_HOLD = (
    "(wallet_id IS NOT NULL AND key_id IS NOT NULL AND model IS NOT NULL)"
    " OR (wallet_id IS NULL AND key_id IS NULL AND model IS NULL"
    " AND state = 'voided' AND amount_nano = 0 AND posted_nano IS NULL)"
)


def upgrade() -> None:
    for column in ("wallet_id", "key_id", "model"):
        op.alter_column("holds", column, nullable=True)
    op.execute(
        f"ALTER TABLE holds ADD CONSTRAINT holds_owned_or_void_before_hold "
        f"CHECK ({OWNED_OR_VOID_BEFORE_HOLD}) NOT VALID"
    )
    with op.get_context().autocommit_block():
        op.execute("ALTER TABLE holds VALIDATE CONSTRAINT holds_owned_or_void_before_hold")


def downgrade() -> None:
    # The voids have no wallet to give back: they are dropped (each held and charged nothing).
    op.execute("DELETE FROM holds WHERE wallet_id IS NULL")
    op.drop_constraint("holds_owned_or_void_before_hold", "holds", type_="check")
    for column in ("wallet_id", "key_id", "model"):
        op.alter_column("holds", column, nullable=False)

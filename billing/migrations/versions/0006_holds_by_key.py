"""Self-service key management (docs/decisions/0032-self-service-keys.md).

``holds_by_key``: a key's last use (its newest hold) and its spend (its posted holds) are read
from the holds it placed, so the Check writes nothing more per request to keep them. Built
CONCURRENTLY (outside the migration's transaction): a plain CREATE INDEX would stop every Check
from placing a hold while a large holds table is indexed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        # An interrupted concurrent build leaves an invalid index behind: a re-run replaces it.
        op.drop_index("holds_by_key", table_name="holds", postgresql_concurrently=True, if_exists=True)
        op.create_index("holds_by_key", "holds", ["key_id", "created_at"], postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("holds_by_key", table_name="holds", postgresql_concurrently=True, if_exists=True)

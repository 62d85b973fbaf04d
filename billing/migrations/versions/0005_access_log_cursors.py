"""Recovery from Envoy's JSON access-log file (docs/decisions/0029-settle-from-the-access-log-file.md).

``access_log_cursors``: how far the sidecar has settled each access-log file, so a restarted or
replaced sidecar carries on where the last one stopped. ``holds_expired_by_resolution``: the
sweep finds expired holds that no access log reported, to charge them their estimate after the
grace period (docs/decisions/0030-unreported-holds.md).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "access_log_cursors",
        sa.Column("log_id", sa.Text, primary_key=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.CheckConstraint("position >= 0", name="access_log_cursors_position_not_negative"),
    )
    op.create_index(
        "holds_expired_by_resolution",
        "holds",
        ["resolved_at"],
        postgresql_where=sa.text("state = 'expired'"),
    )


def downgrade() -> None:
    op.drop_index("holds_expired_by_resolution", table_name="holds")
    op.drop_table("access_log_cursors")

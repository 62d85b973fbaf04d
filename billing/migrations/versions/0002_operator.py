"""What the Kubernetes operator needs: scheduled key revocation, a wallet's Stripe customer.

- ``api_keys.revoke_after``: a rotated key keeps working until this time, then is refused as
  revoked without anyone having to act at that moment (the Check reads it; see
  ``KeyRecord.refusal``). Grace periods therefore survive operator restarts and outages.
- ``api_keys (source, external_id)``: the operator finds an ApiKey resource's keys by its UID.
- ``wallets.stripe_customer_id``: the Stripe customer a Wallet resource declares, if any.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("revoke_after", sa.DateTime(timezone=True), nullable=True))
    op.create_index("api_keys_by_owner", "api_keys", ["source", "external_id"])
    op.add_column("wallets", sa.Column("stripe_customer_id", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("wallets", "stripe_customer_id")
    op.drop_index("api_keys_by_owner", table_name="api_keys")
    op.drop_column("api_keys", "revoke_after")

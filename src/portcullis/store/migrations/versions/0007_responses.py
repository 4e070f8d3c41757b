"""Stored responses of the Responses API (`store: true`): read back, deleted, and continued by
previous_response_id.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "responses" not in sa.inspect(op.get_bind()).get_table_names():
        op.create_table(
            "responses",
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("owner", sa.String(256), nullable=False, index=True),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("expires_at", sa.Float, nullable=False, index=True),
            sa.Column("context", sa.JSON, nullable=False),
            sa.Column("input", sa.JSON, nullable=False),
            sa.Column("response", sa.JSON, nullable=False),
        )


def downgrade() -> None:
    op.drop_table("responses")

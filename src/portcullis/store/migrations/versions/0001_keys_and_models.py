"""API keys and model state.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("user", sa.String(256), nullable=False),
        sa.Column("tier", sa.String(64), nullable=False),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("models", sa.JSON, nullable=True),
        sa.Column("label", sa.String(256), nullable=True),
        sa.Column("limits", sa.JSON, nullable=True),
        sa.Column("budget", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rotated_to", sa.String(32), nullable=True),
        sa.Column("grace_until", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_api_keys_user", "api_keys", ["user"])
    op.create_table(
        "model_state",
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("model_state")
    op.drop_index("ix_api_keys_user", "api_keys")
    op.drop_table("api_keys")

"""Usage records carry an id of their own, unique: a record replayed from the spool after a crash, or written
again for a batch line that ran again, replaces the one already there instead of counting twice.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("record_id", sa.String(160), nullable=True))
    op.create_index("ux_usage_record_id", "usage", ["record_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_usage_record_id", table_name="usage")
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("record_id")

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
    if "record_id" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("usage")}:
        with op.batch_alter_table("usage") as batch:
            batch.add_column(sa.Column("record_id", sa.String(160), nullable=True))
    # Building the index locks the table against writes for as long as it takes. On a large PostgreSQL
    # table, build it beforehand without the lock and this step is skipped:
    #   ALTER TABLE usage ADD COLUMN IF NOT EXISTS record_id VARCHAR(160);
    #   CREATE UNIQUE INDEX CONCURRENTLY ux_usage_record_id ON usage (record_id);
    if "ux_usage_record_id" not in {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes("usage")}:
        op.create_index("ux_usage_record_id", "usage", ["record_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_usage_record_id", table_name="usage")
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("record_id")

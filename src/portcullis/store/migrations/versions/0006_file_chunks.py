"""Uploaded files are stored in bounded chunks (file_chunks) rather than one value: an upload is streamed
to the database without being held in memory whole, and read back the same way.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "file_chunks" not in sa.inspect(op.get_bind()).get_table_names():
        op.create_table(
            "file_chunks",
            sa.Column("file_id", sa.String(40), primary_key=True),
            sa.Column("seq", sa.Integer, primary_key=True),
            sa.Column("data", sa.LargeBinary, nullable=False),
        )


def downgrade() -> None:
    op.drop_table("file_chunks")

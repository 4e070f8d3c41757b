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
    # Before 0006 a file's bytes were all in files.content: put each file's chunks back after its inline part
    # (one file in memory at a time), or the files uploaded since would read back empty.
    bind = op.get_bind()
    chunks = sa.table("file_chunks", sa.column("file_id"), sa.column("seq"), sa.column("data", sa.LargeBinary))
    files = sa.table("files", sa.column("id"), sa.column("content", sa.LargeBinary))
    for (file_id,) in bind.execute(sa.select(chunks.c.file_id).distinct()).all():
        inline = bind.execute(sa.select(files.c.content).where(files.c.id == file_id)).scalar()
        parts = bind.execute(sa.select(chunks.c.data).where(chunks.c.file_id == file_id).order_by(chunks.c.seq))
        content = b"".join([inline or b"", *(bytes(row[0]) for row in parts)])
        bind.execute(sa.update(files).where(files.c.id == file_id).values(content=content))
    op.drop_table("file_chunks")

"""Alembic environment: always handed a live (sync-facing) connection by portcullis.store.db."""

from alembic import context

from portcullis.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

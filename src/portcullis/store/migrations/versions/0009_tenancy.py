"""Organisations, teams and their members; every key belongs to a team. Existing keys move into the default
organisation's default team, so nothing a key could do changes (the default levels grant every model and add no
limit).

Only adds: a gateway of the previous revision keeps running against the upgraded schema (it neither reads nor
writes the new column), so processes can be upgraded one at a time.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

DEFAULT_ORG, DEFAULT_TEAM = "org_default", "team_default"


def upgrade() -> None:
    bind = op.get_bind()
    tables = set(sa.inspect(bind).get_table_names())
    now = sa.func.now()
    if "organizations" not in tables:
        orgs = op.create_table(
            "organizations",
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("name", sa.String(128), nullable=False, unique=True),
            sa.Column("models", sa.JSON, nullable=True),
            sa.Column("default_tier", sa.String(64), nullable=True),
            sa.Column("limits", sa.JSON, nullable=True),
            sa.Column("budget", sa.JSON, nullable=True),
            sa.Column("moderation", sa.JSON, nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        )
        op.execute(orgs.insert().values(id=DEFAULT_ORG, name="default", models=None, created_at=now, updated_at=now))
    if "teams" not in tables:
        teams = op.create_table(
            "teams",
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("org_id", sa.String(32), nullable=False, index=True),
            sa.Column("name", sa.String(128), nullable=False),
            sa.Column("models", sa.JSON, nullable=True),
            sa.Column("default_tier", sa.String(64), nullable=True),
            sa.Column("limits", sa.JSON, nullable=True),
            sa.Column("budget", sa.JSON, nullable=True),
            sa.Column("moderation", sa.JSON, nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.UniqueConstraint("org_id", "name", name="uq_teams_org_name"),
        )
        op.execute(
            teams.insert().values(
                id=DEFAULT_TEAM, org_id=DEFAULT_ORG, name="default", models=None, created_at=now, updated_at=now
            )
        )
    if "memberships" not in tables:
        op.create_table(
            "memberships",
            sa.Column("org_id", sa.String(32), primary_key=True),
            # "" for a role in the organisation itself (org_admin), else the team's id
            sa.Column("team_id", sa.String(32), primary_key=True),
            sa.Column("user", sa.String(256), primary_key=True),
            sa.Column("role", sa.String(16), nullable=False),
            sa.Column("source", sa.String(8), nullable=False, server_default="admin"),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Index("ix_memberships_user", "user"),
        )
    if "team_id" not in {c["name"] for c in sa.inspect(bind).get_columns("api_keys")}:
        with op.batch_alter_table("api_keys") as batch:
            batch.add_column(sa.Column("team_id", sa.String(32), nullable=True))
    keys = sa.table("api_keys", sa.column("team_id", sa.String))
    op.execute(keys.update().where(keys.c.team_id.is_(None)).values(team_id=DEFAULT_TEAM))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("team_id")
    op.drop_table("memberships")
    op.drop_table("teams")
    op.drop_table("organizations")

"""Projects, users, tokens, audit log and events; machines, images and jobs get a project.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    projects = op.create_table(
        "projects",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("quota_machines", sa.BigInteger(), nullable=True),
        sa.Column("quota_cpus", sa.BigInteger(), nullable=True),
        sa.Column("quota_memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("quota_disk_bytes", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    # Machines made before projects existed belong to the default project.
    now = datetime.now(UTC).replace(tzinfo=None)
    op.bulk_insert(projects, [{"name": "default", "created_at": now}])
    op.create_table(
        "users",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "memberships",
        sa.Column(
            "user", sa.String(63), sa.ForeignKey("users.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "project", sa.String(63), sa.ForeignKey("projects.name", ondelete="CASCADE"),
            primary_key=True,
        ),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "user", sa.String(63), sa.ForeignKey("users.name", ondelete="CASCADE"),
            nullable=False, index=True,
        ),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(), nullable=False, index=True),
        sa.Column("actor", sa.String(63), nullable=False),
        sa.Column("action", sa.String(128), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("project", sa.String(63), nullable=True, index=True),
        sa.Column("message", sa.Text(), nullable=False),
    )
    op.create_index("ix_events_target", "events", ["target", "id"])
    # batch mode: SQLite cannot add a foreign key to an existing table in place.
    with op.batch_alter_table("machines") as batch:
        batch.add_column(
            sa.Column("project", sa.String(63), nullable=False, server_default="default")
        )
        batch.add_column(sa.Column("disk_bytes", sa.BigInteger(), nullable=True))
        batch.create_foreign_key(
            "fk_machines_project", "projects", ["project"], ["name"], ondelete="RESTRICT"
        )
        batch.create_index("ix_machines_project", ["project"])
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("project", sa.String(63), nullable=True))
        batch.create_foreign_key(
            "fk_images_project", "projects", ["project"], ["name"], ondelete="RESTRICT"
        )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("project", sa.String(63), nullable=True))
        batch.create_index("ix_jobs_project", ["project"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_project")
        batch.drop_column("project")
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint("fk_images_project", type_="foreignkey")
        batch.drop_column("project")
    with op.batch_alter_table("machines") as batch:
        batch.drop_index("ix_machines_project")
        batch.drop_constraint("fk_machines_project", type_="foreignkey")
        batch.drop_column("disk_bytes")
        batch.drop_column("project")
    for table in ("events", "audit", "tokens", "memberships", "users", "projects"):
        op.drop_table(table)

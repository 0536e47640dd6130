"""Hosts, images, machines, jobs and their steps.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("uri", sa.String(255), nullable=False, unique=True),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("accelerator", sa.String(16), nullable=False),
        sa.Column("accelerator_note", sa.Text(), nullable=False),
        sa.Column("pool_name", sa.String(63), nullable=False),
        sa.Column("pool_path", sa.Text(), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("path", sa.Text(), nullable=False, unique=True),
        sa.Column("source_format", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("virtual_size", sa.BigInteger(), nullable=False),
        sa.Column("kernel", sa.Text(), nullable=True),
        sa.Column("initrd", sa.Text(), nullable=True),
        sa.Column("cmdline", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "machines",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("uuid", sa.String(36), nullable=False, unique=True),
        sa.Column("mac", sa.String(17), nullable=True, unique=True),
        sa.Column("hostname", sa.String(63), nullable=False),
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column(
            "host", sa.String(63), sa.ForeignKey("hosts.name", ondelete="RESTRICT"), nullable=False
        ),
        sa.Column(
            "image", sa.String(63), sa.ForeignKey("images.name", ondelete="RESTRICT"), nullable=True
        ),
        sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("clone_mode", sa.String(16), nullable=True),
        sa.Column("disk_path", sa.Text(), nullable=False),
        sa.Column("seed_path", sa.Text(), nullable=True),
        sa.Column("record_state", sa.String(16), nullable=False),
        sa.Column("managed", sa.Boolean(), nullable=False),
        sa.Column("ssh_keys", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "job_steps",
        sa.Column(
            "job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    for table in ("job_steps", "jobs", "machines", "images", "hosts"):
        op.drop_table(table)

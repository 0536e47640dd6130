"""The pool: host states, tags and overcommit ratios; claims and placement hints on
machines; image requirements; which images each host holds.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as t:
        t.add_column(sa.Column("network", sa.String(63), nullable=False,
                               server_default="corral"))
        t.add_column(sa.Column("disk_bytes", sa.BigInteger(), nullable=False,
                               server_default="0"))
        t.add_column(sa.Column("cpu_score", sa.Float(), nullable=True))
        t.add_column(sa.Column("state", sa.String(16), nullable=False, server_default="up"))
        t.add_column(sa.Column("state_note", sa.Text(), nullable=False, server_default=""))
        t.add_column(sa.Column("last_seen", sa.DateTime(), nullable=True))
        t.add_column(sa.Column("tags", sa.JSON(), nullable=False, server_default="[]"))
        t.add_column(sa.Column("cpu_ratio", sa.Float(), nullable=True))
        t.add_column(sa.Column("memory_ratio", sa.Float(), nullable=True))
        t.add_column(sa.Column("disk_ratio", sa.Float(), nullable=True))
    with op.batch_alter_table("machines") as t:
        t.add_column(sa.Column("disk_claim", sa.BigInteger(), nullable=False,
                               server_default="0"))
        t.add_column(sa.Column("placement", sa.JSON(), nullable=False, server_default="{}"))
        t.add_column(sa.Column("placement_group", sa.String(63), nullable=True))
        t.create_index("ix_machines_host", ["host"])
        t.create_index("ix_machines_placement_group", ["placement_group"])
    # A full copy claims its whole size; linked clones made before claims claim nothing.
    op.execute(
        "UPDATE machines SET disk_claim = COALESCE(disk_bytes, 0) WHERE clone_mode = 'full'"
    )
    with op.batch_alter_table("images") as t:
        t.add_column(sa.Column("arch", sa.String(32), nullable=False, server_default="x86_64"))
        t.add_column(sa.Column("accelerator", sa.String(16), nullable=True))
    op.create_table(
        "host_images",
        sa.Column("host", sa.String(63), sa.ForeignKey("hosts.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("image", sa.String(63), sa.ForeignKey("images.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("bytes_done", sa.BigInteger(), nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("host_images")
    with op.batch_alter_table("images") as t:
        t.drop_column("accelerator")
        t.drop_column("arch")
    with op.batch_alter_table("machines") as t:
        t.drop_index("ix_machines_placement_group")
        t.drop_index("ix_machines_host")
        for name in ("placement_group", "placement", "disk_claim"):
            t.drop_column(name)
    with op.batch_alter_table("hosts") as t:
        for name in ("disk_ratio", "memory_ratio", "cpu_ratio", "tags", "last_seen",
                     "state_note", "state", "cpu_score", "disk_bytes", "network"):
            t.drop_column(name)

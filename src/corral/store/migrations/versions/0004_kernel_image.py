"""Machines that boot with another image's kernel: imported disks without a boot loader.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("machines") as t:
        t.add_column(sa.Column("kernel_image", sa.String(63), nullable=True))
        t.create_foreign_key("fk_machines_kernel_image", "images", ["kernel_image"], ["name"],
                             ondelete="RESTRICT")


def downgrade() -> None:
    with op.batch_alter_table("machines") as t:
        t.drop_constraint("fk_machines_kernel_image", type_="foreignkey")
        t.drop_column("kernel_image")

"""Storage pools added by type (``corral pool add``), and the pool each disk lives in.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "storage_pools",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("type", sa.String(63), nullable=False),
        sa.Column("host", sa.String(63), sa.ForeignKey("hosts.name", ondelete="RESTRICT"),
                  nullable=False),
        sa.Column("path", sa.Text(), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    with op.batch_alter_table("machines") as t:
        t.add_column(sa.Column("storage_pool", sa.String(63), nullable=True))
        t.create_foreign_key("fk_machines_storage_pool", "storage_pools", ["storage_pool"],
                             ["name"], ondelete="RESTRICT")


def downgrade() -> None:
    with op.batch_alter_table("machines") as t:
        t.drop_constraint("fk_machines_storage_pool", type_="foreignkey")
        t.drop_column("storage_pool")
    op.drop_table("storage_pools")

"""What each machine's disk owns, as last measured: disk quotas count it.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("machines") as t:
        t.add_column(sa.Column("owned_bytes", sa.BigInteger(), nullable=False,
                               server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("machines") as t:
        t.drop_column("owned_bytes")

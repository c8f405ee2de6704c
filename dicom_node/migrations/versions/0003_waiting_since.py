"""When a job last started waiting: at reception, or at an operator's retry or resend.

The oldest waiting job's age and a job's time to delivery count from it: from the reception time, a resent job
received a month ago read as a queue stuck for a month. Filled with the reception time.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add jobs.waiting_since, filled with created_at."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('waiting_since', sa.DateTime(), nullable=True))
    op.execute("UPDATE jobs SET waiting_since = created_at")


def downgrade() -> None:
    """Not supported: restore the database backup taken before the upgrade (deploy/README.md, Upgrade). On
    SQLite, dropping a column rebuilds the jobs table, and its foreign keys would empty job_events and
    deliveries with it."""
    raise NotImplementedError("going back to an older release means restoring the database backup taken "
                              "before the upgrade")

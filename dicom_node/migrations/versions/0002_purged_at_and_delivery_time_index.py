"""Retention's mark on the job row, and the indexes that keep retention and the delivery list fast.

``jobs.purged_at``: when retention deleted the job's files (before, only a ``retention:`` job event said so,
and every run re-read the whole history to skip purged jobs); filled from those events. A partial index holds
the finished jobs with files left to delete: the only ones retention has to look at. ``deliveries.at`` is
indexed for the newest-first delivery list.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNPURGED = ("purged_at IS NULL AND finished_at IS NOT NULL "
             "AND (spool_path != '' OR output_dir IS NOT NULL)")


def upgrade() -> None:
    """Add jobs.purged_at (filled from the retention events), its partial index, and ix_deliveries_at."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purged_at', sa.DateTime(), nullable=True))
    op.execute(
        "UPDATE jobs SET purged_at = (SELECT MIN(e.at) FROM job_events e WHERE e.job_id = jobs.id "
        "AND e.message LIKE 'retention:%') "
        "WHERE EXISTS (SELECT 1 FROM job_events e WHERE e.job_id = jobs.id AND e.message LIKE 'retention:%')")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_unpurged', ['id'], unique=False,
                              sqlite_where=sa.text(_UNPURGED), postgresql_where=sa.text(_UNPURGED))
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deliveries_at'), ['at'], unique=False)


def downgrade() -> None:
    """Not supported: restore the database backup taken before the upgrade (deploy/README.md, Upgrade). On
    SQLite, dropping a column rebuilds the jobs table, and its foreign keys would empty job_events and
    deliveries with it."""
    raise NotImplementedError("going back to an older release means restoring the database backup taken "
                              "before the upgrade")

"""Alembic environment of cxr-node.

Normally run through :func:`dicom_node.db.init_db`, which passes its open connection in
``config.attributes["connection"]``. For manual use (``alembic -c <ini>``) the URL comes from the
``sqlalchemy.url`` option of that ini file.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from dicom_node.db import Base, make_engine

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations() -> None:
    """Upgrade over the connection handed in by ``init_db``, or over a new one from the ini's URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url in the Alembic configuration")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; run `cxr-node serve` or init_db")
run_migrations()

"""Engine set-up and schema migrations.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed step survives a power
cut, which the job journal relies on. PostgreSQL works by URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA_REVISION = "0006"
"""Alembic's head; checked against the scripts by a test, so start-up need not parse them."""


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # A pool as large as the server's thread pool: a connection opened past the pool
        # is closed after one use, and opening one (with its pragmas) costs a millisecond.
        engine = create_engine(url, connect_args={"timeout": 30}, pool_size=40,
                               max_overflow=10)
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; issue it ourselves so that
        # "BEGIN IMMEDIATE" takes the write lock up front and writers never deadlock.
        # Read-only sessions begin deferred: under WAL they neither wait nor block.
        event.listen(engine, "begin", _begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _begin(conn: Connection) -> None:
    read_only = conn.get_execution_options().get("corral_read_only", False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # see the "begin" listener above
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def migrate(engine: Engine) -> None:
    """Bring the schema to head; cheap when it already is."""
    if current_revision(engine) == SCHEMA_REVISION:
        return
    # Imported here: alembic costs ~100 ms, which every command would pay at start.
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        return None if row is None else str(row[0])

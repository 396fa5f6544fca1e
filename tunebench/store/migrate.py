"""Schema migrations of the results store, run by engine.py when a database is opened.

Version 1 -> 2: problems gain a ``page`` column (a paged cache's page size; issue 19) and their unique constraint
gains it too, so that one bucket can hold a winner per page size.
- Dense rows get page NO_PAGE (0).
- Paged rows get NULL: they were tuned while the page was a search dimension (each trial's BLOCK_SIZE was in its
  config), so no single page is theirs. Their trials and winners stay in the file, as history, but nothing reads them
  (Store.winners and Store.timings skip them), and their kernel identity is stale anyway (SPACE lost BLOCK_SIZE).

SQLite cannot alter a unique constraint, so the table is rebuilt (create, copy, drop, rename: SQLite's documented
procedure, with foreign keys off) in one transaction. PostgreSQL alters the table in place, also in one transaction.
A read-only open of a version-1 SQLite file migrates a copy in memory and leaves the file as it is.

Version 2 -> 3: problems gain a ``kv_dtype`` column (the KV cache's dtype where it differs from the problem's, an fp8
cache; issue 19) and their unique constraint gains it too, so that a decode bucket holds a winner per cache dtype.
Every older row gets SAME_KV (''): it was tuned on a cache of its own dtype, so it reads back as kv_dtype None. The
same rebuild (or, on PostgreSQL, the same in-place steps) takes a version-1 file straight to version 3.
"""
from __future__ import annotations

from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.pool import StaticPool

from ..shapes import PAGED_KERNELS
from .models import NO_PAGE, SAME_KV, ProblemModel, SchemaVersionModel

# Columns added since version 1 (page by 2, kv_dtype by 3): an older file lacks some of them until it is migrated.
ADDED = frozenset({("problems", "page"), ("problems", "kv_dtype")})
_PAGED = ", ".join(f"'{k}'" for k in PAGED_KERNELS)
_UNIQUE_V1 = '"kernel", "B", "Hq", "Hkv", "Nq", "Nk", "D", "dtype", "causal"'
_COLUMNS = f'"id", {_UNIQUE_V1}'


def _page_sql(from_version: int) -> str:
    """The page of a row of a version-``from_version`` problems table, as SQL."""
    if from_version >= 2:
        return '"page"'
    return f"CASE WHEN kernel IN ({_PAGED}) THEN NULL ELSE {NO_PAGE} END"


def migrate_sqlite(engine: Engine, to_version: int) -> bool:
    """Rebuilds an older SQLite database's problems table; True if it migrated (False: another process did)."""
    raw = engine.raw_connection()
    try:
        cur = raw.driver_connection.cursor()
        cur.execute("PRAGMA foreign_keys = OFF")          # a no-op inside a transaction: set before BEGIN
        cur.execute("BEGIN IMMEDIATE")
        try:
            from_version = cur.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()[0]
            if from_version >= to_version:
                cur.execute("ROLLBACK")
                return False
            new = str(_create_sql(engine)).replace('CREATE TABLE problems', 'CREATE TABLE problems_new', 1)
            cur.execute(new)
            cur.execute(f'INSERT INTO problems_new ({_COLUMNS}, "page", "kv_dtype") SELECT {_COLUMNS}, '
                        f"{_page_sql(from_version)}, '{SAME_KV}' FROM problems")
            cur.execute("DROP TABLE problems")
            cur.execute("ALTER TABLE problems_new RENAME TO problems")
            if cur.execute("PRAGMA foreign_key_check").fetchall():
                raise RuntimeError("foreign keys broken by the migration")
            cur.execute("UPDATE schema_version SET version = ? WHERE id = 1", (to_version,))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        finally:
            cur.execute("PRAGMA foreign_keys = ON")
        return True
    finally:
        raw.close()


def _create_sql(engine: Engine):
    from sqlalchemy.schema import CreateTable
    return CreateTable(ProblemModel.__table__).compile(dialect=engine.dialect)


def migrate_postgresql(connection, from_version: int, to_version: int) -> None:
    """Alters an older problems table in place, inside the caller's transaction (PostgreSQL's DDL is transactional).
    The caller holds the creation lock and has checked the version."""
    (old,) = [c["name"] for c in inspect(connection).get_unique_constraints("problems")]
    if from_version < 2:
        connection.exec_driver_sql('ALTER TABLE problems ADD COLUMN page INTEGER')
        connection.exec_driver_sql(f"UPDATE problems SET page = {NO_PAGE} WHERE kernel NOT IN ({_PAGED})")
    connection.exec_driver_sql(f"ALTER TABLE problems ADD COLUMN kv_dtype VARCHAR(256) NOT NULL DEFAULT '{SAME_KV}'")
    connection.exec_driver_sql(f'ALTER TABLE problems DROP CONSTRAINT "{old}"')
    connection.exec_driver_sql(f'ALTER TABLE problems ADD UNIQUE ({_UNIQUE_V1}, page, kv_dtype)')
    connection.execute(SchemaVersionModel.__table__.update().where(SchemaVersionModel.id == 1)
                       .values(version=to_version))


def memory_copy(engine: Engine, listen) -> Engine:
    """A private in-memory copy of a SQLite database (SQLite's backup API), to migrate without touching the file.
    ``listen`` sets up the new engine's connections as the store's own (engine._listen_sqlite)."""
    copy = listen(create_engine("sqlite://", poolclass=StaticPool), False)
    src, dst = engine.raw_connection(), copy.raw_connection()
    try:
        src.driver_connection.backup(dst.driver_connection)
    finally:
        src.close()
        dst.close()
    return copy

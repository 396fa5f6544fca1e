"""Where the results database is and how it is opened: URLs, SQLAlchemy engines, SQLite and PostgreSQL setup, and the
schema checks made before anything is read or written.

Concurrency: SQLite runs in WAL mode with a busy timeout, and every write transaction starts with BEGIN IMMEDIATE, so
many processes can write at once and none fails a read-then-write upgrade with "database is locked".

On PostgreSQL the tables live in their own schema (PG_SCHEMA), so that one database can hold both the results and
Optuna's studies (both have a `trials` table): `--db` and `--storage` may be the same URL. Processes creating the tables
at once take turns (an advisory lock) instead of failing on PostgreSQL's non-atomic CREATE TABLE.

A read-only open never creates or changes a file.

Schema versions: 2 keys problems by the paged cache's page size too, 3 by the KV cache's dtype too (an fp8 cache; both
issue 19). An older database is migrated when opened writable (migrate.py, in one transaction); opened read-only, a
SQLite file is migrated in a private in-memory copy, and another database is refused with a StoreError saying how to
migrate it.
"""
from __future__ import annotations

import os
import pathlib
from urllib.request import pathname2url

from sqlalchemy import create_engine, event, inspect, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from .. import __version__
from . import migrate
from .models import Base, SchemaVersionModel

SCHEMA_VERSION = 3
BUSY_TIMEOUT_MS = 30_000
PG_SCHEMA = "tunebench_results"     # on PostgreSQL the tables live in this schema (see _listen_postgresql)
PG_CREATE_LOCK = 0x7475_6E65        # advisory lock key held while creating the tables ("tune")


class StoreError(RuntimeError):
    """The database cannot be used: missing, corrupt, a newer schema, or a database error (the message names it)."""


# -- where the database is


def default_db_path() -> pathlib.Path:
    """The per-user database `tunebench tune` writes: $TUNEBENCH_HOME/results.db, else
    $XDG_DATA_HOME/tunebench/results.db, else ~/.local/share/tunebench/results.db."""
    if os.environ.get("TUNEBENCH_HOME"):
        return pathlib.Path(os.environ["TUNEBENCH_HOME"]).expanduser() / "results.db"
    data = os.environ.get("XDG_DATA_HOME") or pathlib.Path.home() / ".local" / "share"
    return pathlib.Path(data).expanduser() / "tunebench" / "results.db"


def resolve_url(db: str | os.PathLike | None) -> str:
    """None -> the per-user database; a plain path -> sqlite:///absolute/path; a SQLAlchemy URL as it is."""
    if db is None:
        db = default_db_path()
    db = os.fspath(db)
    if "://" in db:
        return db
    path = str(pathlib.Path(db).expanduser().resolve())
    # SQLAlchemy unquotes the database part of a URL: keep %, ? and # in a file name from being read as URL syntax.
    return "sqlite:///" + path.replace("%", "%25").replace("?", "%3F").replace("#", "%23")


def open_engine(url: str, readonly: bool) -> tuple[Engine, str]:
    """An engine on a database whose schema has been checked (and, unless ``readonly``, created where missing), and
    the name to give it in messages: the file of a SQLite URL, else the URL without its password."""
    try:
        parsed = make_url(url)
    except Exception as e:  # sqlalchemy raises ArgumentError, ValueError, ... for malformed URLs
        raise StoreError(f"not a database URL: {url!r} ({e})") from e
    where = parsed.render_as_string(hide_password=True)
    path = _sqlite_path(parsed)
    if path is not None:
        where = str(path)
        _prepare_file(path, readonly)
    try:
        engine = _make_engine(parsed, path, readonly)
    except (SQLAlchemyError, ImportError) as e:  # an unknown dialect, or its driver is not installed
        raise StoreError(f"cannot use the results database URL {where}: {type(e).__name__}: {e}") from e
    try:
        _open(engine, where, readonly)
    except _ReadOnlyOldSchema as old:
        engine = _migrated_copy(engine, path, where, old.version)
    except StoreError:
        engine.dispose()
        raise
    except SQLAlchemyError as e:
        engine.dispose()
        if not (readonly and path is not None and not os.access(path.parent, os.W_OK)):
            raise StoreError(describe(where, e)) from e
        # A WAL database in a read-only folder cannot be opened mode=ro (no -shm can be made): nothing can write
        # there either, so it is safe to read it as immutable.
        engine = _make_engine(parsed, path, readonly, immutable=True)
        try:
            _open(engine, where, readonly)
        except SQLAlchemyError as e:
            engine.dispose()
            raise StoreError(describe(where, e)) from e
    return engine, where


class _ReadOnlyOldSchema(Exception):
    """An older database opened read-only: it is read through a migrated copy, or refused."""

    def __init__(self, version: int):
        super().__init__(version)
        self.version = version


def _migrated_copy(engine: Engine, path: pathlib.Path | None, where: str, version: int) -> Engine:
    """An older SQLite file opened read-only: an in-memory copy, migrated; the file is left as it is."""
    try:
        if path is None:
            raise StoreError(f"{where} has results schema version {version}; open it writable once (e.g. "
                             f"`tunebench tune --db ...`) to migrate it to version {SCHEMA_VERSION}")
        copy = migrate.memory_copy(engine, _listen_sqlite)
    finally:
        engine.dispose()
    try:
        migrate.migrate_sqlite(copy, SCHEMA_VERSION)
        _open(copy, where, readonly=True)
    except BaseException:
        copy.dispose()
        raise
    return copy


def describe(where: str, error: SQLAlchemyError) -> str:
    """A database error as a message that names the database and, for the common cases, says what is wrong."""
    detail = str(getattr(error, "orig", None) or error).strip()
    if "not a database" in detail or "malformed" in detail:
        return f"{where} is not a readable SQLite database (corrupt or another kind of file): {detail}"
    if "unable to open" in detail:
        return f"cannot open the results database {where}: {detail}"
    return f"results database {where}: {detail}"


def _prepare_file(path: pathlib.Path, readonly: bool) -> None:
    if readonly:
        if not path.is_file():
            raise StoreError(f"no results database at {path} (`tunebench tune` creates one)")
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the folder for the results database {path}: {e}") from e


def _sqlite_path(url) -> pathlib.Path | None:
    """The file behind a SQLite URL, or None for memory databases and other dialects."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:"):
        return None  # a SQLite URI: the caller chose its own open mode
    return pathlib.Path(url.database)


def _make_engine(url, path: pathlib.Path | None, readonly: bool, immutable: bool = False) -> Engine:
    if url.get_backend_name() == "postgresql":
        return _listen_postgresql(create_engine(url, pool_pre_ping=True))
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if path is None:
        if url.database in (None, "", ":memory:"):
            # One shared connection, so that a memory database lives as long as the engine.
            return _listen_sqlite(create_engine(url, poolclass=StaticPool), readonly)
        return _listen_sqlite(create_engine(url), readonly)
    if readonly:
        # A URI opened read-only, so that reading a database never creates or changes a file.
        mode = "immutable=1" if immutable else "mode=ro"
        url = url.set(database=f"file:{pathname2url(str(path))}?{mode}", query={"uri": "true"})
    return _listen_sqlite(create_engine(url), readonly)


def _listen_sqlite(engine: Engine, readonly: bool) -> Engine:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, connection_record):
        # sqlite3's own transaction handling would BEGIN lazily (deferred) and commit before DDL; take it over.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not readonly:
            # WAL: readers never block writers; NORMAL sync is durable against a killed process in WAL mode.
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection):
        # IMMEDIATE takes the write lock up front (waiting up to the busy timeout). A deferred transaction that reads
        # and then writes fails at once with "database is locked" if another writer committed in between.
        reading = readonly or connection.get_execution_options().get("tunebench_read", False)
        connection.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

    return engine


def _listen_postgresql(engine: Engine) -> Engine:
    """Our tables live in their own schema, so that the store and Optuna's studies can share one database (both
    have a `trials` table): every connection of the store sees that schema only. Its name is not a likely role name:
    PostgreSQL's default search_path puts a schema named like the user first, so a schema `tunebench` would be where
    Optuna, connecting as user `tunebench`, created (and looked for) its own tables."""
    @event.listens_for(engine, "connect", insert=True)
    def on_connect(dbapi_connection, connection_record):
        # Outside a transaction: a SET inside one is undone when the pool rolls the connection back.
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET SESSION search_path TO {PG_SCHEMA}")
        cursor.close()
        dbapi_connection.autocommit = autocommit

    return engine


def _lock_for_creation(connection) -> None:
    """Makes a process creating the tables wait for another one doing it (on PostgreSQL, concurrent CREATE TABLE of
    one name fails with a unique violation rather than waiting); on SQLite, BEGIN IMMEDIATE already serialises."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_CREATE_LOCK})")
        connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}")




# -- the schema


def _open(engine: Engine, where: str, readonly: bool) -> None:
    """Checks the schema version (before creating anything) and, unless read-only, creates what is missing."""
    with engine.execution_options(tunebench_read=True).begin() as connection:
        version = _schema_version(connection, where)
        old = version is not None and version < SCHEMA_VERSION
        complete = version is not None and _check_tables(connection, where, migrate.ADDED if old else frozenset())
    if old and not complete:
        raise StoreError(f"{where} is not a tunebench results database (schema version {version} without its "
                         f"tables)")
    if old:
        if readonly:
            raise _ReadOnlyOldSchema(version)
        _migrate(engine)
        return _open(engine, where, readonly)
    if readonly and not complete:
        raise StoreError(f"{where} is not a tunebench results database (no schema version or tables)")
    if complete or readonly:
        return
    with engine.begin() as connection:  # a write transaction: one process creates, racing ones then see it
        _lock_for_creation(connection)
        version = _schema_version(connection, where)
        Base.metadata.create_all(connection)
        if version is None:
            connection.execute(SchemaVersionModel.__table__.insert().values(
                id=1, version=SCHEMA_VERSION, written_by=__version__))
        _check_tables(connection, where)


def _schema_version(connection, where: str) -> int | None:
    if SchemaVersionModel.__tablename__ not in inspect(connection).get_table_names():
        return None
    version = connection.scalar(select(SchemaVersionModel.version).where(SchemaVersionModel.id == 1))
    if version is not None and type(version) is not int:  # SQLite keeps whatever was put in a column
        raise StoreError(f"{where} has a schema version {version!r} that is not a number: it is not a "
                         f"tunebench results database")
    if version is not None and version > SCHEMA_VERSION:
        raise StoreError(f"{where} has results schema version {version}, newer than the {SCHEMA_VERSION} "
                         f"this tunebench {__version__} reads: upgrade tunebench to use it")
    if version is not None and version < 1:
        raise StoreError(f"{where} has results schema version {version}: no tunebench wrote it")
    return version


def _migrate(engine: Engine) -> None:
    """Migrates an older database to SCHEMA_VERSION in one transaction (racing processes: one migrates)."""
    if engine.dialect.name == "sqlite":
        migrate.migrate_sqlite(engine, SCHEMA_VERSION)
        return
    with engine.begin() as connection:
        _lock_for_creation(connection)
        version = _schema_version(connection, "")
        if version < SCHEMA_VERSION:
            migrate.migrate_postgresql(connection, version, SCHEMA_VERSION)


def _check_tables(connection, where: str, added: frozenset = frozenset()) -> bool:
    """Whether all our tables exist. A table of ours with other columns (e.g. Optuna's own `trials` in the same
    file) is refused by name. ``added``: (table, column) pairs a migration will add, not required yet."""
    inspector = inspect(connection)
    names = set(inspector.get_table_names())
    for table in Base.metadata.sorted_tables:
        if table.name not in names:
            return False
        missing = ({c.name for c in table.columns if (table.name, c.name) not in added}
                   - {c["name"] for c in inspector.get_columns(table.name)})
        if missing:
            raise StoreError(f"{where} has a table {table.name!r} without columns {sorted(missing)}: it is "
                             f"not tunebench's (an Optuna storage? give Optuna its own database)")
    return True

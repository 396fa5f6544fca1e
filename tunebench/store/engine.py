"""Where the results database is and how it is opened: URLs, SQLAlchemy engines, SQLite and PostgreSQL setup, and the
schema checks made before anything is read or written.

Concurrency: SQLite runs in WAL mode with a busy timeout, and every write transaction starts with BEGIN IMMEDIATE, so
many processes can write at once and none fails a read-then-write upgrade with "database is locked".

On PostgreSQL the tables live in their own schema (PG_SCHEMA), so that one database can hold both the results and
Optuna's studies (both have a `trials` table): `--db` and `--storage` may be the same URL. Processes creating the tables
at once take turns (an advisory lock) instead of failing on PostgreSQL's non-atomic CREATE TABLE.

A read-only open never creates or changes a file.

Connections time out: a PostgreSQL (or MySQL) server that accepts and never answers fails after connect_timeout_s()
(TUNEBENCH_CONNECT_TIMEOUT_S, default 10 s) with a message naming the host, where it would otherwise hang for minutes.

Before `tunebench tune` writes anything, check_writable() inspects an SQLite results file read-only (no WAL switch):
tables that are neither tunebench's nor Optuna's, a newer schema, a file or folder it cannot write are refused then.

Schema versions: 2 keys problems by the paged cache's page size too, 3 by the KV cache's dtype too (an fp8 cache; both
issue 19). An older database is migrated when opened writable (migrate.py, in one transaction); opened read-only, a
SQLite file is migrated in a private in-memory copy, and another database is refused with a StoreError saying how to
migrate it.
"""
from __future__ import annotations

import math
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
CONNECT_TIMEOUT_S = 10.0            # a database server's connect timeout, unless TUNEBENCH_CONNECT_TIMEOUT_S says
# Optuna's RDB storage tables (optuna 3.x-5.x, storages/_rdb/models.py, and alembic's): a results file may hold them.
OPTUNA_TABLES = frozenset({"studies", "study_directions", "study_system_attributes", "study_user_attributes",
                           "trial_heartbeats", "trial_intermediate_values", "trial_params", "trial_system_attributes",
                           "trial_user_attributes", "trial_values", "trials", "version_info", "alembic_version"})


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
        if not readonly:
            check_writable(url)         # read-only first: a file that is not ours is refused untouched (no WAL switch)
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
        if path is None and connect_failed(e):
            raise StoreError(describe_connect(where, parsed, e)) from e
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


def connect_failed(error: BaseException) -> bool:
    """Whether a database error is a failure to connect (the server refused, timed out, is unknown)."""
    from sqlalchemy.exc import OperationalError
    return isinstance(error, OperationalError) and \
        any(word in str(error).lower() for word in ("connect", "timeout", "refused", "resolve", "host"))


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


# -- connecting to a server


def connect_timeout_s() -> float:
    """Seconds a connection to a database server may take: $TUNEBENCH_CONNECT_TIMEOUT_S, else CONNECT_TIMEOUT_S."""
    text = os.environ.get("TUNEBENCH_CONNECT_TIMEOUT_S")
    if not text:
        return CONNECT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"$TUNEBENCH_CONNECT_TIMEOUT_S must be a number of seconds > 0, got {text!r}")
    return value


def connect_args(url) -> dict:
    """The DBAPI connect arguments that bound a server connection's setup (libpq's and MySQL's connect_timeout, whole
    seconds); none for SQLite. A connect_timeout in the URL itself wins."""
    url = make_url(url)
    if url.get_backend_name() not in ("postgresql", "mysql", "mariadb") or "connect_timeout" in url.query:
        return {}
    return {"connect_timeout": max(1, math.ceil(connect_timeout_s()))}


def describe_connect(where: str, url, error: BaseException) -> str:
    """A failed connection to a database server: the host and port, and for a timeout, the setting that bounds it."""
    url = make_url(url)
    host = f"{url.host or 'localhost'}{f':{url.port}' if url.port else ''}"
    detail = str(getattr(error, "orig", None) or error).strip()
    if "timeout" in detail.lower():
        return (f"cannot connect to the database server {host} for {where}: no answer within "
                f"{math.ceil(connect_timeout_s())} s (TUNEBENCH_CONNECT_TIMEOUT_S): {detail}")
    return f"cannot connect to the database server {host} for {where}: {detail}"


def check_reachable(url: str, where: str) -> None:
    """Connects to a database server once and disconnects (creating nothing): StoreError naming the host where it
    cannot be reached in time. SQLite URLs pass (there is no server)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return
    engine = create_engine(parsed, connect_args=connect_args(parsed))
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        raise StoreError(describe_connect(where, parsed, e)) from e
    finally:
        engine.dispose()


# -- an SQLite file tune will write, checked before anything is


def check_writable(url: str) -> None:
    """StoreError, before anything is created or changed, where `tunebench tune` could not or must not write the
    results database at url: an SQLite file (or its folder) it cannot write, a file holding tables that are neither
    tunebench's nor Optuna's, a newer schema, a corrupt file. It reads the file read-only (no WAL switch). Other
    databases are checked when opened (open_engine), which comes before anything else is written."""
    parsed = make_url(url)
    path = _sqlite_path(parsed)
    if path is None:
        return
    check_writable_file(path, "the results database")
    if not path.is_file() or path.stat().st_size == 0:
        return
    engine = _make_engine(parsed, path, readonly=True)
    try:
        with engine.execution_options(tunebench_read=True).begin() as connection:
            _schema_version(connection, str(path))
            ours = {table.name for table in Base.metadata.sorted_tables}
            names = set(inspect(connection).get_table_names())
            foreign = sorted(n for n in names - ours - OPTUNA_TABLES if not n.startswith("sqlite_"))
    except SQLAlchemyError as e:
        raise StoreError(describe(str(path), e)) from e
    finally:
        engine.dispose()
    if foreign:
        shown = ", ".join(map(repr, foreign[:8])) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise StoreError(f"{path} holds tables that are not tunebench's ({shown}): tunebench writes only a database "
                         f"of its own; give --db a new file")


def check_writable_file(path: pathlib.Path, what: str) -> None:
    """StoreError unless SQLite can write the file at path: the file, if it exists, and its folder (or the nearest
    folder that exists, where it would be created), where SQLite keeps the -wal and -shm files beside it."""
    if path.exists() and not path.is_file():
        raise StoreError(f"{what} {path} is not a file")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(f"{what} {path} is read-only, and tunebench tune writes it: give it a file you can write")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write in the folder {folder} of {what} {path} (SQLite keeps its -wal and -shm "
                         f"files there)")


# -- opening a file


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
        return _listen_postgresql(create_engine(url, pool_pre_ping=True, connect_args=connect_args(url)))
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args(url))
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

"""The results store: devices, kernels (with a hash of their source), bucketed problems, trials and winners.

SQLAlchemy 2.x typed ORM over any SQLAlchemy URL; an embedded SQLite file by default. Modelled on Optuna's storage
layer: declarative models with their unique constraints, small classmethod queries, a single-row schema-version table,
and one session context manager that owns commit, rollback and close and turns database errors into StoreError.

Concurrency: SQLite runs in WAL mode with a busy timeout, and every write transaction starts with BEGIN IMMEDIATE, so
many processes can write at once and none fails a read-then-write upgrade with "database is locked". A winner is
written by one atomic INSERT ... ON CONFLICT DO UPDATE ... WHERE faster, so a faster time replaces a slower one and
never the reverse, whatever the interleaving.

On PostgreSQL the tables live in their own schema (PG_SCHEMA), so that one database can hold both the results and
Optuna's studies (both have a `trials` table): `--db` and `--storage` may be the same URL. Processes creating the tables
at once take turns (an advisory lock) instead of failing on PostgreSQL's non-atomic CREATE TABLE.

Nothing read from a database is imported, evaluated or unpickled: configs are JSON, kernel names map through
tunebench.registry, and winners() drops (with a StoreWarning) any row that does not pass the registry and SPACE.
Non-finite floats are kept explicitly: the float column holds NULL and a JSON ``nonfinite`` column names the value.

Not imported by ``import tunebench``: the dispatcher imports it on its first call.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.request import pathname2url

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, create_engine, event, func, inspect, select)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from . import __version__
from .device import DeviceIdentity
from .shapes import Problem, bucket

SCHEMA_VERSION = 1
STATUSES = ("ok", "pruned", "out_of_resources", "compile_error", "incorrect", "timeout", "crashed")
BUSY_TIMEOUT_MS = 30_000
NAME_LENGTH = 256
PG_SCHEMA = "tunebench_results"     # on PostgreSQL the tables live in this schema (see _listen_postgresql)
PG_CREATE_LOCK = 0x7475_6E65        # advisory lock key held while creating the tables ("tune")
# The only non-finite markers written or read; anything else in a nonfinite column is ignored.
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class StoreError(RuntimeError):
    """The database cannot be used: missing, corrupt, a newer schema, or a database error (the message names it)."""


class StoreWarning(UserWarning):
    """A row read from a database was skipped (unknown kernel, config outside SPACE, malformed values)."""


@dataclass
class TrialResult:
    number: int
    config: dict
    status: str                         # one of STATUSES
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    throughput: float | None = None     # TFLOP/s for dense kernels, GB/s for paged
    err_ratio: float | None = None      # error / allowed (Verdict.ratio)
    message: str = ""
    started_at: datetime | None = None  # naive datetimes are taken as local time; read back in UTC
    finished_at: datetime | None = None


@dataclass(frozen=True)
class Winner:
    device: str
    capability: str
    kernel: str
    source_hash: str
    problem: Problem                    # bucketed
    config: dict
    median_ms: float
    speedup_vs_default: float | None
    speedup_vs_peer: float | None
    torch: str
    triton: str
    updated_at: datetime
    is_speed_measurement: bool = True


TRIAL_FLOATS = ("median_ms", "p20_ms", "p80_ms", "throughput", "err_ratio")
WINNER_FLOATS = ("speedup_vs_default", "speedup_vs_peer")


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


# -- the models


class Base(DeclarativeBase):
    @classmethod
    def id_for(cls, session: Session, **values) -> int:
        """The id of the row with exactly these values, inserted first if there is none (safe against a racing
        insert of the same row by another process)."""
        where = [getattr(cls, k) == v for k, v in values.items()]
        found = session.scalar(select(cls.id).where(*where))
        if found is not None:
            return found
        insert = _dialect_insert(session, cls)
        if insert is not None:
            session.execute(insert.values(**values).on_conflict_do_nothing())
        else:
            try:
                with session.begin_nested():
                    session.add(cls(**values))
            except IntegrityError:
                pass  # another writer inserted it first
        return session.scalar(select(cls.id).where(*where))


class SchemaVersionModel(Base):
    __tablename__ = "schema_version"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    written_by: Mapped[str] = mapped_column(String(NAME_LENGTH))  # tunebench version that created the database

    @classmethod
    def find(cls, session: Session) -> int | None:
        return session.scalar(select(cls.version).where(cls.id == 1))


class DeviceModel(Base):
    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("name", "capability", "sm_count", "memory_bytes", "driver", "torch", "triton",
                                       "is_speed_measurement"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    capability: Mapped[str] = mapped_column(String(NAME_LENGTH))
    sm_count: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    driver: Mapped[str] = mapped_column(String(NAME_LENGTH))
    torch: Mapped[str] = mapped_column(String(NAME_LENGTH))
    triton: Mapped[str] = mapped_column(String(NAME_LENGTH))
    is_speed_measurement: Mapped[bool] = mapped_column(Boolean)

    @classmethod
    def identity_values(cls, device: DeviceIdentity) -> dict:
        return dict(name=device.name, capability=device.capability, sm_count=int(device.sm_count),
                    memory_bytes=int(device.memory_bytes), driver=device.driver, torch=device.torch,
                    triton=device.triton, is_speed_measurement=bool(device.is_speed_measurement))


class KernelModel(Base):
    __tablename__ = "kernels"
    __table_args__ = (UniqueConstraint("name", "source_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    source_hash: Mapped[str] = mapped_column(String(NAME_LENGTH))


class ProblemModel(Base):
    __tablename__ = "problems"
    __table_args__ = (UniqueConstraint("kernel", "B", "Hq", "Hkv", "Nq", "Nk", "D", "dtype", "causal"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kernel: Mapped[str] = mapped_column(String(NAME_LENGTH))
    B: Mapped[int] = mapped_column(Integer)
    Hq: Mapped[int] = mapped_column(Integer)
    Hkv: Mapped[int] = mapped_column(Integer)
    Nq: Mapped[int] = mapped_column(Integer)
    Nk: Mapped[int] = mapped_column(Integer)
    D: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(NAME_LENGTH))
    causal: Mapped[bool] = mapped_column(Boolean)

    @classmethod
    def bucket_values(cls, problem: Problem) -> dict:
        b = bucket(problem)  # the one shape-to-bucket map, shared with the dispatcher
        return dict(kernel=b.kernel, B=b.B, Hq=b.Hq, Hkv=b.Hkv, Nq=b.Nq, Nk=b.Nk, D=b.D, dtype=b.dtype,
                    causal=bool(b.causal))

    @classmethod
    def matching(cls, problem: Problem):
        return [getattr(cls, k) == v for k, v in cls.bucket_values(problem).items()]

    def to_problem(self) -> Problem:
        return Problem(self.kernel, self.B, self.Hq, self.Hkv, self.Nq, self.Nk, self.D, self.dtype, self.causal)


class TrialModel(Base):
    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("device_id", "kernel_id", "problem_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    kernel_id: Mapped[int] = mapped_column(ForeignKey("kernels.id"))
    problem_id: Mapped[int] = mapped_column(ForeignKey("problems.id"))
    number: Mapped[int] = mapped_column(Integer)
    config_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(32))
    median_ms: Mapped[float | None] = mapped_column(Float(precision=53))
    p20_ms: Mapped[float | None] = mapped_column(Float(precision=53))
    p80_ms: Mapped[float | None] = mapped_column(Float(precision=53))
    throughput: Mapped[float | None] = mapped_column(Float(precision=53))
    err_ratio: Mapped[float | None] = mapped_column(Float(precision=53))
    nonfinite: Mapped[str | None] = mapped_column(Text)  # JSON {column: "nan" | "inf" | "-inf"}
    message: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @classmethod
    def upsert(cls, session: Session, key: dict, values: dict) -> None:
        """One row per trial number: a retried trial replaces its earlier record."""
        insert = _dialect_insert(session, cls)
        if insert is not None:
            session.execute(insert.values(**key, **values).on_conflict_do_update(index_elements=list(key),
                                                                                 set_=values))
            return
        row = session.scalars(select(cls).filter_by(**key).with_for_update()).one_or_none()
        if row is None:
            session.add(cls(**key, **values))
        else:
            for name, value in values.items():
                setattr(row, name, value)

    def to_result(self) -> TrialResult:
        floats = _read_floats(self, TRIAL_FLOATS)
        return TrialResult(self.number, json.loads(self.config_json), self.status, **floats, message=self.message,
                           started_at=_as_utc(self.started_at), finished_at=_as_utc(self.finished_at))


class WinnerModel(Base):
    __tablename__ = "winners"
    __table_args__ = (UniqueConstraint("device_id", "kernel_id", "problem_id"),
                      CheckConstraint("median_ms > 0", name="positive_time"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    kernel_id: Mapped[int] = mapped_column(ForeignKey("kernels.id"))
    problem_id: Mapped[int] = mapped_column(ForeignKey("problems.id"))
    config_json: Mapped[str] = mapped_column(Text)
    median_ms: Mapped[float] = mapped_column(Float(precision=53))
    speedup_vs_default: Mapped[float | None] = mapped_column(Float(precision=53))
    speedup_vs_peer: Mapped[float | None] = mapped_column(Float(precision=53))
    nonfinite: Mapped[str | None] = mapped_column(Text)  # JSON {column: "nan" | "inf" | "-inf"}
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    @classmethod
    def upsert_faster(cls, session: Session, key: dict, values: dict) -> bool:
        """Writes the row unless the stored one is at least as fast, in one atomic statement; True if written."""
        insert = _dialect_insert(session, cls)
        if insert is not None:
            insert = insert.values(**key, **values)
            insert = insert.on_conflict_do_update(
                index_elements=list(key), set_={name: insert.excluded[name] for name in values},
                where=insert.excluded.median_ms < cls.__table__.c.median_ms)
            # preserve_rowcount: SQLAlchemy 2.1 with psycopg reports -1 for an INSERT otherwise (SQLite counts anyway).
            return session.execute(insert, execution_options={"preserve_rowcount": True}).rowcount == 1
        row = session.scalars(select(cls).filter_by(**key).with_for_update()).one_or_none()
        if row is None:
            session.add(cls(**key, **values))
            return True
        if values["median_ms"] < row.median_ms:
            for name, value in values.items():
                setattr(row, name, value)
            return True
        return False


def _dialect_insert(session: Session, model: type[Base]):
    """An INSERT that knows ON CONFLICT, on the dialects that have it (SQLite, PostgreSQL); else None."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        return None
    return insert(model.__table__)


# -- values in and out of rows


def _split_floats(values: dict) -> tuple[dict, str | None]:
    """Finite floats stay in their columns; NaN and +-inf become NULL there and a marker in the nonfinite JSON."""
    columns, markers = {}, {}
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            markers[name] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            value = None
        columns[name] = None if value is None else float(value)
    return columns, (json.dumps(markers, sort_keys=True) if markers else None)


def _read_floats(row, names: tuple[str, ...]) -> dict:
    markers = json.loads(row.nonfinite) if row.nonfinite else {}
    markers = markers if isinstance(markers, dict) else {}
    out = {}
    for name in names:
        value = getattr(row, name)
        if value is None and markers.get(name) in NONFINITE:
            value = NONFINITE[markers[name]]
        out[name] = value
    return out


def _config_json(config: dict) -> str:
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise TypeError(f"config must be a dict with str keys, got {config!r}")
    return json.dumps(config, sort_keys=True, allow_nan=False)


def _utc(when: datetime | None) -> datetime | None:
    return None if when is None else when.astimezone(timezone.utc)


def _as_utc(when: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything this module wrote was UTC."""
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=timezone.utc)


# -- the engine


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


# -- the store


class Store:
    """The results database. ``readonly=True`` opens an existing database without creating or changing anything."""

    def __init__(self, url: str | None = None, *, readonly: bool = False):
        self.url = resolve_url(url)
        self.readonly = readonly
        try:
            parsed = make_url(self.url)
        except Exception as e:  # sqlalchemy raises ArgumentError, ValueError, ... for malformed URLs
            raise StoreError(f"not a database URL: {self.url!r} ({e})") from e
        self.where = parsed.render_as_string(hide_password=True)
        path = _sqlite_path(parsed)
        if path is not None:
            self.where = str(path)
            self._prepare_file(path)
        try:
            self.engine = _make_engine(parsed, path, readonly)
        except (SQLAlchemyError, ImportError) as e:  # an unknown dialect, or its driver is not installed
            raise StoreError(f"cannot use the results database URL {self.where}: {type(e).__name__}: {e}") from e
        try:
            self._open()
        except StoreError:
            self.engine.dispose()
            raise
        except SQLAlchemyError as e:
            self.engine.dispose()
            if readonly and path is not None and not os.access(path.parent, os.W_OK):
                # A WAL database in a read-only folder cannot be opened mode=ro (no -shm can be made): nothing can
                # write there either, so it is safe to read it as immutable.
                self.engine = _make_engine(parsed, path, readonly, immutable=True)
                self._open_or_raise()
            else:
                raise StoreError(self._describe(e)) from e
        self._sessions = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(bind=self.engine.execution_options(tunebench_read=True),
                                           expire_on_commit=False)
        self._id_cache: dict[tuple, int] = {}

    def __repr__(self) -> str:
        return f"Store({self.where!r}{', readonly=True' if self.readonly else ''})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prepare_file(self, path: pathlib.Path) -> None:
        if self.readonly:
            if not path.is_file():
                raise StoreError(f"no results database at {path} (`tunebench tune` creates one)")
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the folder for the results database {path}: {e}") from e

    def _open_or_raise(self) -> None:
        try:
            self._open()
        except SQLAlchemyError as e:
            self.engine.dispose()
            raise StoreError(self._describe(e)) from e

    def _open(self) -> None:
        """Checks the schema version (before creating anything) and, unless read-only, creates what is missing."""
        with self.engine.execution_options(tunebench_read=True).begin() as connection:
            version = self._schema_version(connection)
            complete = version is not None and self._check_tables(connection)
        if self.readonly and not complete:
            raise StoreError(f"{self.where} is not a tunebench results database (no schema version or tables)")
        if complete or self.readonly:
            return
        with self.engine.begin() as connection:  # a write transaction: one process creates, racing ones then see it
            _lock_for_creation(connection)
            version = self._schema_version(connection)
            Base.metadata.create_all(connection)
            if version is None:
                connection.execute(SchemaVersionModel.__table__.insert().values(
                    id=1, version=SCHEMA_VERSION, written_by=__version__))
            self._check_tables(connection)

    def _schema_version(self, connection) -> int | None:
        if SchemaVersionModel.__tablename__ not in inspect(connection).get_table_names():
            return None
        version = connection.scalar(select(SchemaVersionModel.version).where(SchemaVersionModel.id == 1))
        if version is not None and type(version) is not int:  # SQLite keeps whatever was put in a column
            raise StoreError(f"{self.where} has a schema version {version!r} that is not a number: it is not a "
                             f"tunebench results database")
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(f"{self.where} has results schema version {version}, newer than the {SCHEMA_VERSION} "
                             f"this tunebench {__version__} reads: upgrade tunebench to use it")
        if version is not None and version < SCHEMA_VERSION:
            raise StoreError(f"{self.where} has results schema version {version}, older than {SCHEMA_VERSION}; "
                             f"no migration exists: re-tune into a new database")
        return version

    def _check_tables(self, connection) -> bool:
        """Whether all our tables exist. A table of ours with other columns (e.g. Optuna's own `trials` in the same
        file) is refused by name."""
        inspector = inspect(connection)
        names = set(inspector.get_table_names())
        for table in Base.metadata.sorted_tables:
            if table.name not in names:
                return False
            missing = {c.name for c in table.columns} - {c["name"] for c in inspector.get_columns(table.name)}
            if missing:
                raise StoreError(f"{self.where} has a table {table.name!r} without columns {sorted(missing)}: it is "
                                 f"not tunebench's (an Optuna storage? give Optuna its own database)")
        return True

    def _describe(self, error: SQLAlchemyError) -> str:
        detail = str(getattr(error, "orig", None) or error).strip()
        if "not a database" in detail or "malformed" in detail:
            return f"{self.where} is not a readable SQLite database (corrupt or another kind of file): {detail}"
        if "unable to open" in detail:
            return f"cannot open the results database {self.where}: {detail}"
        return f"results database {self.where}: {detail}"

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        """A session that commits on success, rolls back on any error, always closes, and raises database errors
        as StoreError. On SQLite it holds the write lock from its start unless ``read_only`` (WAL readers see a
        consistent snapshot and never wait for writers)."""
        session = (self._read_sessions if read_only else self._sessions)()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as e:
            _rollback(session)
            raise StoreError(self._describe(e)) from e
        except BaseException:
            _rollback(session)
            raise
        finally:
            session.close()

    # -- writes

    @contextmanager
    def _writing(self, device: DeviceIdentity, kernel: str, source_hash: str, problem: Problem):
        """A session and the device, kernel and problem ids of a write. Ids are cached once committed, so that a
        write holds SQLite's write lock for one statement, not four."""
        if problem.kernel != kernel:
            raise ValueError(f"problem is for kernel {problem.kernel!r}, not {kernel!r}")
        rows = {DeviceModel: DeviceModel.identity_values(device),
                KernelModel: dict(name=kernel, source_hash=source_hash),
                ProblemModel: ProblemModel.bucket_values(problem)}
        keys = {model: (model, tuple(sorted(values.items()))) for model, values in rows.items()}
        with self.session() as session:
            ids = {model: self._id_cache.get(keys[model]) or model.id_for(session, **values)
                   for model, values in rows.items()}
            yield session, dict(device_id=ids[DeviceModel], kernel_id=ids[KernelModel],
                                problem_id=ids[ProblemModel])
        self._id_cache.update({keys[model]: ids[model] for model in rows})

    def record_trial(self, device: DeviceIdentity, kernel: str, source_hash: str, problem: Problem,
                     t: TrialResult) -> None:
        """Stores one trial; recording the same trial number again (a retry) replaces the earlier record."""
        self._writable()
        if t.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {t.status!r}")
        floats, nonfinite = _split_floats({name: getattr(t, name) for name in TRIAL_FLOATS})
        values = dict(config_json=_config_json(t.config), status=t.status, **floats, nonfinite=nonfinite,
                      message=str(t.message or ""), started_at=_utc(t.started_at), finished_at=_utc(t.finished_at))
        with self._writing(device, kernel, source_hash, problem) as (session, ids):
            TrialModel.upsert(session, dict(**ids, number=int(t.number)), values)

    def upsert_winner(self, device: DeviceIdentity, kernel: str, source_hash: str, problem: Problem, config: dict,
                      median_ms: float, speedup_vs_default: float | None,
                      speedup_vs_peer: float | None = None) -> bool:
        """Atomically keeps the faster of this and the stored winner; True if this one was written."""
        self._writable()
        from .registry import KERNELS
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
        if not (isinstance(median_ms, (int, float)) and math.isfinite(median_ms) and median_ms > 0):
            raise ValueError(f"a winner needs a finite median_ms > 0, got {median_ms!r}")
        floats, nonfinite = _split_floats(dict(speedup_vs_default=speedup_vs_default,
                                               speedup_vs_peer=speedup_vs_peer))
        values = dict(config_json=_config_json(config), median_ms=float(median_ms), **floats, nonfinite=nonfinite,
                      updated_at=datetime.now(timezone.utc))
        with self._writing(device, kernel, source_hash, problem) as (session, ids):
            written = WinnerModel.upsert_faster(session, ids, values)
        return written

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.where} was opened read-only")

    # -- reads

    @staticmethod
    def _filter_trials(query, device, kernel, source_hash, problem, device_name):
        query = (query.join(DeviceModel, TrialModel.device_id == DeviceModel.id)
                 .join(KernelModel, TrialModel.kernel_id == KernelModel.id)
                 .join(ProblemModel, TrialModel.problem_id == ProblemModel.id))
        if isinstance(device, DeviceIdentity):
            query = query.where(*[getattr(DeviceModel, k) == v
                                  for k, v in DeviceModel.identity_values(device).items()])
        elif isinstance(device, str):
            device_name = device
        if device_name is not None:
            query = query.where(DeviceModel.name == device_name)
        if kernel is not None:
            query = query.where(KernelModel.name == kernel)
        if source_hash is not None:
            query = query.where(KernelModel.source_hash == source_hash)
        if problem is not None:
            query = query.where(*ProblemModel.matching(problem))
        return query

    def trials(self, device: DeviceIdentity | str | None = None, kernel: str | None = None,
               source_hash: str | None = None, problem: Problem | None = None, *,
               device_name: str | None = None) -> list[TrialResult]:
        """Stored trials, by number; filters as trial_counts."""
        query = self._filter_trials(select(TrialModel), device, kernel, source_hash, problem, device_name)
        with self.session(read_only=True) as session:
            return _readable(self, "trials", lambda: [
                row.to_result() for row in session.scalars(query.order_by(TrialModel.number, TrialModel.id))])

    def trial_counts(self, device: DeviceIdentity | str | None = None, kernel: str | None = None,
                     source_hash: str | None = None, problem: Problem | None = None, *,
                     device_name: str | None = None) -> dict[str, int]:
        """status -> number of stored trials. ``device`` is a DeviceIdentity (that exact device) or a device name;
        ``problem`` is bucketed like everything stored."""
        query = self._filter_trials(select(TrialModel.status, func.count()).select_from(TrialModel), device, kernel,
                                    source_hash, problem, device_name)
        with self.session(read_only=True) as session:
            return {status: count for status, count in session.execute(query.group_by(TrialModel.status))}

    def winners(self, *, device_name: str | None = None, kernel: str | None = None) -> list[Winner]:
        """Stored winners, newest first, each checked against the kernel registry and its SPACE; a row that fails is
        skipped with a StoreWarning naming it."""
        query = (select(WinnerModel, DeviceModel, KernelModel, ProblemModel)
                 .join(DeviceModel, WinnerModel.device_id == DeviceModel.id)
                 .join(KernelModel, WinnerModel.kernel_id == KernelModel.id)
                 .join(ProblemModel, WinnerModel.problem_id == ProblemModel.id)
                 .order_by(WinnerModel.updated_at.desc(), WinnerModel.id.desc()))
        if device_name is not None:
            query = query.where(DeviceModel.name == device_name)
        if kernel is not None:
            query = query.where(KernelModel.name == kernel)
        with self.session(read_only=True) as session:
            rows = _readable(self, "winners", lambda: session.execute(query).all())
        out = []
        for winner, device, kern, problem in rows:
            try:
                out.append(_checked_winner(winner, device, kern, problem))
            except _Rejected as e:
                warnings.warn(f"tunebench: skipping winner #{winner.id} in {self.where} (device {device.name!r}, "
                              f"kernel {kern.name!r}): {e}", StoreWarning, stacklevel=2)
        return out


def _readable(store: "Store", table: str, read):
    """``read()``, with a value SQLAlchemy cannot convert (SQLite keeps any value in any column: a date that is not
    a date, ...) turned into a StoreError naming the database, which the dispatcher reports and skips."""
    try:
        return read()
    except (ValueError, TypeError) as e:
        raise StoreError(f"{store.where} has {table} that cannot be read ({type(e).__name__}: {e}): it was not "
                         f"written by tunebench") from e


class _Rejected(Exception):
    pass


def _checked_winner(winner: WinnerModel, device: DeviceModel, kernel: KernelModel, problem: ProblemModel) -> Winner:
    """The row as a Winner, or _Rejected saying why it cannot be trusted."""
    from .registry import KERNELS, config_in_space, kernel_module
    if kernel.name not in KERNELS:
        raise _Rejected(f"unknown kernel (known: {', '.join(KERNELS)})")
    if problem.kernel != kernel.name:
        raise _Rejected(f"its problem is for kernel {problem.kernel!r}")
    try:
        if not all(type(getattr(problem, f)) is int for f in ("B", "Hq", "Hkv", "Nq", "Nk", "D")):
            raise TypeError("problem sizes must be integers")
        bucketed = problem.to_problem()
        config = json.loads(winner.config_json)
        floats = _read_floats(winner, WINNER_FLOATS)
    except (ValueError, TypeError) as e:
        raise _Rejected(f"malformed row: {e}") from None
    if not isinstance(config, dict):
        raise _Rejected(f"config is not a JSON object: {winner.config_json!r}")
    try:
        why = config_in_space(kernel.name, config)
        space = kernel_module(kernel.name).SPACE
    except ImportError as e:
        raise _Rejected(f"the kernel module cannot be imported: {e}") from None
    # SPACE membership is by ==, so also insist on the type: JSON 1 must not pass for True, nor 64.0 for 64.
    why = why or next((f"{k}={v!r} has the wrong type" for k, v in config.items()
                       if not any(type(v) is type(allowed) and v == allowed for allowed in space[k])), None)
    if why:
        raise _Rejected(f"config outside SPACE: {why}")
    median = winner.median_ms
    if not (type(median) is float and math.isfinite(median) and median > 0):
        raise _Rejected(f"median_ms {median!r} is not a positive time")
    if not all(v is None or type(v) is float for v in floats.values()):
        raise _Rejected(f"speedups {floats} are not numbers")
    return Winner(device.name, device.capability, kernel.name, kernel.source_hash, bucketed,
                  {name: config[name] for name in space}, median, floats["speedup_vs_default"],
                  floats["speedup_vs_peer"], device.torch, device.triton, _as_utc(winner.updated_at),
                  bool(device.is_speed_measurement))


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except SQLAlchemyError:
        pass  # the connection is already gone; closing the session releases it


# -- `tunebench show`


def show_command(args) -> int:
    """`tunebench show [--db URL] [--kernel NAME]`: the winners, grouped by device."""
    store = Store(args.db, readonly=True)
    try:
        winners = store.winners(kernel=args.kernel)
    finally:
        store.close()
    if not winners:
        print(f"no winners in {store.where}")
        return 0
    for device, rows in _by_device(winners).items():
        print(device)
        print(_table(["kernel", "problem (bucket)", "config", "median ms", "vs DEFAULT"],
                     [[w.kernel, w.problem.label(), _format_config(w.config), f"{w.median_ms:.4f}",
                       _format_speedup(w.speedup_vs_default)] for w in rows]))
        print()
    return 0


def _by_device(winners: list[Winner]) -> dict[str, list[Winner]]:
    groups: dict[str, list[Winner]] = {}
    for w in sorted(winners, key=lambda w: (w.device, w.torch, w.triton, w.kernel, w.problem.label())):
        note = "" if w.is_speed_measurement else "  [interpreter: not a speed measurement]"
        groups.setdefault(f"{w.device} (capability {w.capability}, torch {w.torch}, triton {w.triton}){note}",
                          []).append(w)
    return groups


def _format_config(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def _format_speedup(speedup: float | None) -> str:
    return "-" if speedup is None else f"{speedup:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)

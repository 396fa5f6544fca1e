"""The tables of the results store, as SQLAlchemy 2.x typed models, and the values that go in and out of their rows.

Modelled on Optuna's storage layer: declarative models with their unique constraints, small classmethod queries and a
single-row schema-version table. Writes that race are atomic upserts (INSERT ... ON CONFLICT) on the dialects that
have them. Non-finite floats are kept explicitly: the float column holds NULL and a JSON ``nonfinite`` column names
the value. Configs are stored as JSON; nothing read from a row is imported, evaluated or unpickled.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, select)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from ..device import DeviceIdentity
from ..shapes import Problem, bucket
from ..text import loads_bounded

STATUSES = ("ok", "pruned", "out_of_resources", "compile_error", "incorrect", "timeout", "crashed")
NAME_LENGTH = 256
# The only non-finite markers written or read; anything else in a nonfinite column is ignored.
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


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


NO_PAGE = 0   # the page column of a dense problem: 0, not NULL, since NULLs never collide in a unique constraint
SAME_KV = ""  # the kv_dtype column of a problem whose cache has its dtype (kv_dtype None): '', for the same reason


class ProblemModel(Base):
    """A bucketed Problem. ``page`` is the paged cache's page size, NO_PAGE for dense problems, and NULL for paged rows
    migrated from schema 1 (tuned while the page was a search dimension: their page is unknown, so nothing reads
    them; see engine.py). ``kv_dtype`` is the KV cache's dtype where it differs from dtype (an fp8 cache), else
    SAME_KV; rows from before schema 3 get SAME_KV (they were all tuned on a cache of their dtype)."""
    __tablename__ = "problems"
    __table_args__ = (UniqueConstraint("kernel", "B", "Hq", "Hkv", "Nq", "Nk", "D", "dtype", "causal", "page",
                                       "kv_dtype"),)
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
    page: Mapped[int | None] = mapped_column(Integer, nullable=True)
    kv_dtype: Mapped[str] = mapped_column(String(NAME_LENGTH), default=SAME_KV)

    @classmethod
    def bucket_values(cls, problem: Problem) -> dict:
        b = bucket(problem)  # the one shape-to-bucket map, shared with the dispatcher
        return dict(kernel=b.kernel, B=b.B, Hq=b.Hq, Hkv=b.Hkv, Nq=b.Nq, Nk=b.Nk, D=b.D, dtype=b.dtype,
                    causal=bool(b.causal), page=NO_PAGE if b.page is None else b.page,
                    kv_dtype=b.kv_dtype or SAME_KV)

    @classmethod
    def known_page(cls):
        """The rows that can be read as Problems: all but schema-1 paged rows, whose page is unknown."""
        return cls.page.is_not(None)

    @classmethod
    def matching(cls, problem: Problem):
        return [getattr(cls, k) == v for k, v in cls.bucket_values(problem).items()]

    def to_problem(self) -> Problem:
        if self.page is None:
            raise ValueError("a paged problem tuned before the page size was part of the problem (schema 1)")
        page = None if self.page == NO_PAGE else self.page
        return Problem(self.kernel, self.B, self.Hq, self.Hkv, self.Nq, self.Nk, self.D, self.dtype, self.causal, page,
                       self.kv_dtype or None)


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
        """One row per trial number: a retried trial replaces its earlier record. The statement is built once per
        dialect and set of columns and bound to each row's values: building it per row (literal values) took most
        of a trial's write, ~0.4 ms of the tuner's loop per trial."""
        dialect = session.get_bind().dialect.name
        cache_key = (dialect, tuple(key), tuple(values))
        statement = _UPSERTS.get(cache_key)
        if statement is None:
            insert = _dialect_insert(session, cls)
            if insert is not None:
                statement = _UPSERTS[cache_key] = insert.on_conflict_do_update(
                    index_elements=list(key), set_={name: insert.excluded[name] for name in values})
        if statement is not None:
            session.execute(statement, {**key, **values})
            return
        row = session.scalars(select(cls).filter_by(**key).with_for_update()).one_or_none()
        if row is None:
            session.add(cls(**key, **values))
        else:
            for name, value in values.items():
                setattr(row, name, value)

    def to_result(self) -> TrialResult:
        floats = read_floats(self, TRIAL_FLOATS)
        return TrialResult(self.number, loads_bounded(self.config_json, "config_json"), self.status, **floats, message=self.message,
                           started_at=as_utc(self.started_at), finished_at=as_utc(self.finished_at))


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
    def upsert_faster(cls, session: Session, key: dict, values: dict, replace: bool = False) -> bool:
        """Writes the row unless the stored one is at least as fast (``replace``: whatever it is), in one atomic
        statement; True if written."""
        insert = _dialect_insert(session, cls)
        if insert is not None:
            insert = insert.values(**key, **values)
            insert = insert.on_conflict_do_update(
                index_elements=list(key), set_={name: insert.excluded[name] for name in values},
                where=None if replace else insert.excluded.median_ms < cls.__table__.c.median_ms)
            # preserve_rowcount: SQLAlchemy 2.1 with psycopg reports -1 for an INSERT otherwise (SQLite counts anyway).
            return session.execute(insert, execution_options={"preserve_rowcount": True}).rowcount == 1
        row = session.scalars(select(cls).filter_by(**key).with_for_update()).one_or_none()
        if row is None:
            session.add(cls(**key, **values))
            return True
        if replace or values["median_ms"] < row.median_ms:
            for name, value in values.items():
                setattr(row, name, value)
            return True
        return False


_UPSERTS: dict = {}     # (dialect, key columns, value columns) -> TrialModel.upsert's statement


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


def split_floats(values: dict) -> tuple[dict, str | None]:
    """Finite floats stay in their columns; NaN and +-inf become NULL there and a marker in the nonfinite JSON."""
    columns, markers = {}, {}
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            markers[name] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            value = None
        columns[name] = None if value is None else float(value)
    return columns, (json.dumps(markers, sort_keys=True) if markers else None)


def read_floats(row, names: tuple[str, ...]) -> dict:
    markers = loads_bounded(row.nonfinite, "nonfinite") if row.nonfinite else {}
    markers = markers if isinstance(markers, dict) else {}
    out = {}
    for name in names:
        value = getattr(row, name)
        if value is None and markers.get(name) in NONFINITE:
            value = NONFINITE[markers[name]]
        out[name] = value
    return out


def dump_config(config: dict) -> str:
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise TypeError(f"config must be a dict with str keys, got {config!r}")
    return json.dumps(config, sort_keys=True, allow_nan=False)


def utc(when: datetime | None) -> datetime | None:
    return None if when is None else when.astimezone(timezone.utc)


def as_utc(when: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything the store wrote was UTC."""
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=timezone.utc)


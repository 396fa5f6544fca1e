"""The results store: rows in and out. Devices, kernels (with their identity), bucketed problems, trials and winners.

One session context manager owns commit, rollback and close, and turns database errors into StoreError. A winner is
written by one atomic INSERT ... ON CONFLICT DO UPDATE ... WHERE faster, so a faster time replaces a slower one and
never the reverse, whatever the interleaving.

Nothing read from a database is imported, evaluated or unpickled: configs are JSON, and kernel names must be in
tunebench.registry's KERNELS. winners() drops (with a StoreWarning) any row it cannot trust without the kernels:
unknown kernel, malformed JSON, sizes or times of the wrong type. Reading never raises for one bad row: any exception
while a row is turned into values (a RecursionError, a MemoryError, ...) skips that row with one StoreWarning naming
the database and the row, its detail cut to 200 characters (text.clip); JSON is bounded in size and depth before it is
parsed (text.loads_bounded). It never imports a kernel: checking a config against
the kernel's SPACE is its caller's (the dispatcher and `tunebench report` pass registry.checked_config), so that
`tunebench show` lists rows without loading Triton.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..device import DeviceIdentity
from ..registry import known_kernels, readable
from ..shapes import Problem
from ..text import clip, loads_bounded
from .engine import StoreError, describe, open_engine, resolve_url
from .models import (STATUSES, TRIAL_FLOATS, WINNER_FLOATS, DeviceModel, KernelModel, ProblemModel, TrialModel,
                     TrialResult, Winner, WinnerModel, as_utc, dump_config, read_floats, split_floats, utc)

JSON_SCALARS = (bool, int, float, str)


class StoreWarning(UserWarning):
    """A row read from a database was skipped (unknown kernel, config outside SPACE, malformed values)."""


class Store:
    """The results database. ``readonly=True`` opens an existing database without creating or changing anything."""

    def __init__(self, url: str | None = None, *, readonly: bool = False):
        self.url = resolve_url(url)
        self.readonly = readonly
        self.engine, self.where = open_engine(self.url, readonly)
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
            raise StoreError(describe(self.where, e)) from e
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
        floats, nonfinite = split_floats({name: getattr(t, name) for name in TRIAL_FLOATS})
        values = dict(config_json=dump_config(t.config), status=t.status, **floats, nonfinite=nonfinite,
                      message=str(t.message or ""), started_at=utc(t.started_at), finished_at=utc(t.finished_at))
        with self._writing(device, kernel, source_hash, problem) as (session, ids):
            TrialModel.upsert(session, dict(**ids, number=int(t.number)), values)

    def upsert_winner(self, device: DeviceIdentity, kernel: str, source_hash: str, problem: Problem, config: dict,
                      median_ms: float, speedup_vs_default: float | None,
                      speedup_vs_peer: float | None = None, replace: bool = False) -> bool:
        """Atomically keeps the faster of this and the stored winner (``replace``: this one, whatever the stored one's
        time); True if this one was written."""
        self._writable()
        if kernel not in known_kernels():
            raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(known_kernels())}")
        if not (isinstance(median_ms, (int, float)) and math.isfinite(median_ms) and median_ms > 0):
            raise ValueError(f"a winner needs a finite median_ms > 0, got {median_ms!r}")
        floats, nonfinite = split_floats(dict(speedup_vs_default=speedup_vs_default,
                                               speedup_vs_peer=speedup_vs_peer))
        values = dict(config_json=dump_config(config), median_ms=float(median_ms), **floats, nonfinite=nonfinite,
                      updated_at=datetime.now(timezone.utc))
        with self._writing(device, kernel, source_hash, problem) as (session, ids):
            written = WinnerModel.upsert_faster(session, ids, values, replace)
        return written

    def set_speedup_vs_peer(self, device: DeviceIdentity, kernel: str, source_hash: str, problem: Problem,
                            config: dict, speedup_vs_peer: float) -> bool:
        """Sets the stored winner's speedup over its peer kernel, measured anew, if the winner is still ``config``
        (a later, faster winner of another config keeps its own); True if set. Its median_ms stays."""
        self._writable()
        floats, _ = split_floats(dict(speedup_vs_peer=speedup_vs_peer))
        with self._writing(device, kernel, source_hash, problem) as (session, ids):
            row = session.scalars(select(WinnerModel).filter_by(**ids).with_for_update()).one_or_none()
            if row is None or row.config_json != dump_config(config) or floats["speedup_vs_peer"] is None:
                return False
            row.speedup_vs_peer = floats["speedup_vs_peer"]
            return True

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
            with self.reading("trials"):
                rows = list(session.scalars(query.order_by(TrialModel.number, TrialModel.id)))
        out = []
        for row in rows:
            try:
                out.append(row.to_result())
            except Exception as e:  # noqa: BLE001 - a hostile row: skip it, never fail the read
                self._skip(f"trial #{row.id}", e)
        return out

    def trial_counts(self, device: DeviceIdentity | str | None = None, kernel: str | None = None,
                     source_hash: str | None = None, problem: Problem | None = None, *,
                     device_name: str | None = None) -> dict[str, int]:
        """status -> number of stored trials. ``device`` is a DeviceIdentity (that exact device) or a device name;
        ``problem`` is bucketed like everything stored."""
        query = self._filter_trials(select(TrialModel.status, func.count()).select_from(TrialModel), device, kernel,
                                    source_hash, problem, device_name)
        with self.session(read_only=True) as session:
            return {status: count for status, count in session.execute(query.group_by(TrialModel.status))}

    def timings(self, device_name: str) -> list[tuple[str, str, Problem, dict, float]]:
        """(kernel, source_hash, bucket, config, median_ms) of every ok trial measured on a device: the evidence the
        dispatcher's safe transfer reads. A row that cannot be read as such is left out (it is evidence, not a
        winner: nothing is dispatched from it alone)."""
        query = (select(KernelModel.name, KernelModel.source_hash, ProblemModel, TrialModel.config_json,
                        TrialModel.median_ms)
                 .join(DeviceModel, TrialModel.device_id == DeviceModel.id)
                 .join(KernelModel, TrialModel.kernel_id == KernelModel.id)
                 .join(ProblemModel, TrialModel.problem_id == ProblemModel.id)
                 .where(DeviceModel.name == device_name, TrialModel.status == "ok", ProblemModel.known_page()))
        with self.session(read_only=True) as session:
            with self.reading("trials"):
                rows = session.execute(query).all()
        out = []
        for kernel, source_hash, problem, config_json, median in rows:
            if not readable(kernel) or not (type(median) is float and 0 < median < math.inf):
                continue
            try:
                config = loads_bounded(config_json, "config_json")
                bucketed = problem.to_problem()
            except Exception as e:  # noqa: BLE001 - a hostile row: skip it, never fail the read
                self._skip(f"a trial of {kernel} (problem #{problem.id})", e)
                continue
            if isinstance(config, dict):
                out.append((kernel, source_hash, bucketed, config, median))
        return out

    def winners(self, *, device_name: str | None = None, kernel: str | None = None,
                check_config: Callable[[str, dict], dict] | None = None) -> list[Winner]:
        """Stored winners, newest first; schema-1 paged rows (page unknown) are left out. A row that cannot be trusted
        is skipped with a StoreWarning naming it: an unknown kernel, malformed JSON or values of the wrong type, and,
        when ``check_config(kernel, config)`` is given and raises ValueError, a config that check refuses
        (registry.checked_config: outside the kernel's SPACE).
        The config a winner carries is the one check_config returns, else the stored JSON object."""
        query = (select(WinnerModel, DeviceModel, KernelModel, ProblemModel)
                 .join(DeviceModel, WinnerModel.device_id == DeviceModel.id)
                 .join(KernelModel, WinnerModel.kernel_id == KernelModel.id)
                 .join(ProblemModel, WinnerModel.problem_id == ProblemModel.id)
                 .where(ProblemModel.known_page())
                 .order_by(WinnerModel.updated_at.desc(), WinnerModel.id.desc()))
        if device_name is not None:
            query = query.where(DeviceModel.name == device_name)
        if kernel is not None:
            query = query.where(KernelModel.name == kernel)
        with self.session(read_only=True) as session:
            with self.reading("winners"):
                rows = session.execute(query).all()
        out = []
        for winner, device, kern, problem in rows:
            try:
                out.append(_checked_winner(winner, device, kern, problem, check_config))
            except _Rejected as e:
                self._skip(f"winner #{winner.id}", f" (device {clip(repr(device.name), 60)}, kernel "
                                                   f"{clip(repr(kern.name), 60)}): {clip(e)}", stacklevel=3)
            except Exception as e:  # noqa: BLE001 - a hostile row: skip it, never fail the read
                self._skip(f"winner #{winner.id}", e, stacklevel=3)
        return out

    @contextmanager
    def reading(self, what: str = "rows"):
        """Turns any exception while reading (SQLite keeps any value in any column: a date that is not a date, ...)
        into a StoreError naming the database, which the dispatcher reports and skips and the CLI prints."""
        try:
            yield
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a hostile file makes SQLAlchemy raise, name the file
            raise StoreError(f"{self.where} has {what} that cannot be read ({type(e).__name__}: {clip(e)}): it was "
                             f"not written by tunebench") from e

    def _skip(self, row: str, why, stacklevel: int = 3) -> None:
        """One StoreWarning for a row that is skipped: the database, the row, and why (an exception: its type and
        message), cut to 200 characters."""
        if isinstance(why, BaseException):
            why = f": cannot be read ({type(why).__name__}: {clip(why)})"
        warnings.warn(f"tunebench: skipping {row} in {self.where}{why}", StoreWarning, stacklevel=stacklevel)


class _Rejected(Exception):
    pass


def _checked_winner(winner: WinnerModel, device: DeviceModel, kernel: KernelModel, problem: ProblemModel,
                    check_config: Callable[[str, dict], dict] | None) -> Winner:
    """The row as a Winner, or _Rejected saying why it cannot be trusted."""
    if not readable(kernel.name):
        raise _Rejected(f"unknown kernel (known: {', '.join(known_kernels())})")
    if problem.kernel != kernel.name:
        raise _Rejected(f"its problem is for kernel {problem.kernel!r}")
    try:
        if not all(type(getattr(problem, f)) is int for f in ("B", "Hq", "Hkv", "Nq", "Nk", "D")):
            raise TypeError("problem sizes must be integers")
        bucketed = problem.to_problem()
        config = loads_bounded(winner.config_json, "config_json")
        floats = read_floats(winner, WINNER_FLOATS)
    except (ValueError, TypeError) as e:
        raise _Rejected(f"malformed row: {e}") from None
    if not isinstance(config, dict):
        raise _Rejected(f"config is not a JSON object: {winner.config_json!r}")
    if not all(type(v) in JSON_SCALARS and (type(v) is not float or math.isfinite(v)) for v in config.values()):
        raise _Rejected(f"config values must be finite numbers, booleans or strings: {winner.config_json!r}")
    if check_config is not None:
        try:
            config = check_config(kernel.name, config)
        except ValueError as e:
            raise _Rejected(str(e)) from None
    median = winner.median_ms
    if not (type(median) is float and math.isfinite(median) and median > 0):
        raise _Rejected(f"median_ms {median!r} is not a positive time")
    if not all(v is None or type(v) is float for v in floats.values()):
        raise _Rejected(f"speedups {floats} are not numbers")
    return Winner(device.name, device.capability, kernel.name, kernel.source_hash, bucketed, config, median,
                  floats["speedup_vs_default"], floats["speedup_vs_peer"], device.torch, device.triton,
                  as_utc(winner.updated_at), bool(device.is_speed_measurement))


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except SQLAlchemyError:
        pass  # the connection is already gone; closing the session releases it


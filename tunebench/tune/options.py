"""What a tuning run is asked to do: TuneOptions, checked before anything is written."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .study import GRACE_S, HEARTBEAT_S, database_url, hide_password, is_journal, is_sql_journal

TOP_K = 3                       # finalists re-timed against each other (plus DEFAULT)
SETUP_TIMEOUT_S = 600.0         # building a problem's inputs and float64 reference in a worker


@dataclass
class TuneOptions:
    trials: int | None = None           # evaluated configs per problem (None: DEFAULT_TRIALS, or the grid)
    timeout: float = 120.0              # seconds per trial
    sampler: str = "tpe"
    seed: int = 0
    db: str | None = None
    storage: str | None = None
    workers: int = 1
    interpret: bool = False
    compile_workers: int | None = None  # None: a spare core each, <= MAX_COMPILE_WORKERS per runner (0: --interpret)
    top_k: int = TOP_K
    setup_timeout: float = SETUP_TIMEOUT_S
    heartbeat_s: int = HEARTBEAT_S      # how often a run marks its open trials alive
    grace_s: int = GRACE_S              # a trial not marked alive for this long is failed by whoever sees it
    replace: bool = False               # this run's winners replace the stored ones, even faster ones
    exchange: bool = True               # TPE: then each problem times its neighbours' winners (run.exchange)
    queue_runs: bool = True             # a runner busy with a trial gets its next config to start after it

    @classmethod
    def from_args(cls, args) -> "TuneOptions":
        return cls(trials=args.trials, timeout=args.timeout, sampler=args.sampler, seed=args.seed, db=args.db,
                   storage=args.storage, workers=args.workers, interpret=args.interpret,
                   compile_workers=getattr(args, "compile_workers", None), replace=getattr(args, "replace", False),
                   exchange=not getattr(args, "no_exchange", False),
                   heartbeat_s=_env_seconds("TUNEBENCH_HEARTBEAT_S", HEARTBEAT_S),
                   grace_s=_env_seconds("TUNEBENCH_GRACE_S", GRACE_S))

    def validate(self) -> None:
        if self.trials is not None and self.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {self.trials}")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"--timeout must be a finite number of seconds > 0, got {self.timeout}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.sampler not in ("tpe", "grid"):
            raise ValueError(f"--sampler must be tpe or grid, got {self.sampler!r}")
        if self.compile_workers is not None and self.compile_workers < 0:
            raise ValueError(f"--compile-workers must be >= 0, got {self.compile_workers}")
        if not 1 <= self.heartbeat_s < self.grace_s:
            raise ValueError(f"the heartbeat ({self.heartbeat_s} s) must be >= 1 s and shorter than the grace period "
                             f"({self.grace_s} s), or live trials would be failed as stale")
        if self.storage is not None:
            _check_storage_url(self.storage)


def _check_storage_url(url: str) -> None:
    """A --storage that cannot name a database is refused before anything is written (tune creates the results
    database before it opens the storage): not a URL (nor a journal file's path, ending .journal), an unknown dialect
    or one whose driver is not installed, or an SQLite or journal file in a missing folder. (run.preflight then
    checks that it can be written.)"""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    if is_journal(url):
        _check_folder(os.path.expanduser(url), "a journal file")
        return
    if is_sql_journal(url):
        url = database_url(url)
        if not url.startswith("postgresql"):
            raise ValueError(f"--storage journal:URL keeps Optuna's journal in a PostgreSQL table (its appends take "
                             f"an advisory lock): give a postgresql:// URL after journal:, got {hide_password(url)!r}")
    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()     # its driver: a mysql:// URL without MySQLdb fails here, not later
    except (ArgumentError, NoSuchModuleError, ValueError, ImportError) as e:
        raise ValueError(f"--storage is not a database URL that SQLAlchemy can use: {hide_password(url)} "
                         f"({type(e).__name__}: {e})") from None
    path = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if path and path != ":memory:" and not path.startswith("file:"):
        _check_folder(path, "an SQLite file")


def _check_folder(path: str, what: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--storage names {what} in a folder that does not exist: {folder}")


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be a whole number of seconds, got {value!r}") from None


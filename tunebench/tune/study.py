"""Optuna glue: the storage (a journal file beside the results database, shared by processes of one host, or a
--storage URL such as PostgreSQL, shared by hosts), the study of each problem, its samplers, and the one place SPACE
becomes suggestions.

One study per device x kernel x kernel identity x bucketed problem, so that a stopped run resumes and several
processes or hosts share studies; its name reads in optuna-dashboard (study_name), its user attributes say what it
measured and which config won (open_study, record_winner). Nothing here runs a trial.
"""
from __future__ import annotations

import os
import random
import time
import warnings
from typing import TYPE_CHECKING

from ..shapes import Problem, bucket_key

if TYPE_CHECKING:
    from .options import TuneOptions

HEARTBEAT_S = 30                # Optuna trial heartbeat; a trial silent for GRACE_S is stale (its run died)
GRACE_S = 120                   # both can be set (whole seconds) by $TUNEBENCH_HEARTBEAT_S and $TUNEBENCH_GRACE_S
STORAGE_OPEN_TRIES = 3
JOURNAL_SUFFIX = ".optuna.journal"  # results.db -> results.optuna.journal, the studies' default file (journal.py)


def suggest_config(trial, space: dict) -> dict:
    """The one place SPACE becomes Optuna suggestions: one categorical per key, in SPACE's order."""
    return {name: trial.suggest_categorical(name, list(values)) for name, values in space.items()}


def all_configs(space: dict) -> list[dict]:
    """Every combination of SPACE's values (kept or not), in SPACE's order."""
    import itertools
    return [dict(zip(space, values)) for values in itertools.product(*space.values())]


def grid_order(space: dict, default: dict, seed: int) -> list[dict]:
    """The order `--sampler grid` enqueues configs in: DEFAULT first, then every SPACE combination shuffled by seed
    (repeats and keep-rejected configs are skipped when enqueued)."""
    rest = all_configs(space)
    random.Random(seed).shuffle(rest)
    return [default] + rest


def open_storage(storage_url: str | None, results_url: str, heartbeat_s: int = HEARTBEAT_S,
                 grace_s: int = GRACE_S):
    """Optuna's storage (where: storage_url_for). A journal file (journal.JournalStudies) beside an SQLite results
    database, or a --storage path ending .journal; the journal in a PostgreSQL table for `journal:URL` (journal_sql,
    for many hosts); Optuna's RDB storage for a --storage URL (PostgreSQL for many hosts, or sqlite:///), and for the
    SQLite file that runs before the journal kept beside the results; memory for a memory database. On PostgreSQL
    the studies and results can share a database: the store keeps its tables in a schema of their own. A server's
    connection times out (store.engine.connect_timeout_s)."""
    import optuna
    from ..store.engine import connect_args, connect_failed, describe_connect
    storage_url = storage_url_for(storage_url, results_url)
    if storage_url is None:
        return optuna.storages.InMemoryStorage()
    if is_journal(storage_url):
        from .journal import JournalStudies
        try:
            return JournalStudies(storage_url, heartbeat_s, grace_s, retry_once)
        except OSError as e:
            raise RuntimeError(f"cannot open the Optuna journal {storage_url}: {e}") from e
    if is_sql_journal(storage_url):
        from .journal import JournalStudies
        from .journal_sql import SqlLog
        url = database_url(storage_url)
        try:
            return JournalStudies(SqlLog(url), heartbeat_s, grace_s, retry_once)
        except Exception as e:  # sqlalchemy raises many kinds for a bad URL or an unreachable server
            where = f"the Optuna journal table at {hide_password(url)}"
            raise RuntimeError(describe_connect(where, url, e) if connect_failed(e) else
                               f"cannot open {where}: {type(e).__name__}: {e}") from e
    sqlite = storage_url.startswith("sqlite")
    engine_kwargs = ({"connect_args": {"timeout": 60}} if sqlite else
                     {"pool_pre_ping": True, "connect_args": connect_args(storage_url)})
    for attempt in range(STORAGE_OPEN_TRIES):
        try:
            storage = optuna.storages.RDBStorage(storage_url, engine_kwargs=engine_kwargs,
                                                 heartbeat_interval=heartbeat_s, grace_period=grace_s,
                                                 heartbeat_stale_trial_callback=retry_once)
            if sqlite:
                _write_ahead(storage.engine)
            return storage
        except Exception as e:  # sqlalchemy and optuna raise many kinds for a bad URL or an unreachable server
            if attempt + 1 < STORAGE_OPEN_TRIES and _lost_creation_race(e):
                time.sleep(0.5 + random.random())
                continue
            where = f"the Optuna storage {hide_password(storage_url)}"
            raise RuntimeError(describe_connect(where, storage_url, e) if connect_failed(e) else
                               f"cannot open {where}: {type(e).__name__}: {e}") from e


def close_storage(storage) -> None:
    """Gives back the server connections of a storage from open_storage (Optuna's RDB engine, or the journal
    table's: journal_sql.SqlLog); nothing for a file or memory."""
    engine = getattr(storage, "engine", None) or getattr(getattr(storage, "log", None), "engine", None)
    if engine is not None:
        engine.dispose()


def storage_url_for(storage_url: str | None, results_url: str) -> str | None:
    """Where Optuna's studies are: --storage (a database URL, or a journal file's path, made absolute), else a file
    beside an SQLite results database: results.db -> results.optuna.journal, or results.optuna.db (an SQLite URL)
    where that exists and the journal does not (a run started before the journal was the default resumes there).
    None for a memory one. ValueError where there is none to give, or where --storage and --db name one SQLite file."""
    from sqlalchemy.engine import make_url
    if storage_url is None:
        url = make_url(results_url)
        if url.get_backend_name() != "sqlite" or (url.database or "").startswith("file:"):
            raise ValueError(f"give --storage URL for Optuna's studies: only an SQLite --db gets one beside it "
                             f"(--db is {url.render_as_string(hide_password=True)})")
        if url.database in (None, "", ":memory:"):
            return None
        base = os.path.splitext(os.path.abspath(url.database))[0]
        journal, legacy = base + JOURNAL_SUFFIX, base + ".optuna.db"
        return "sqlite:///" + legacy if os.path.exists(legacy) and not os.path.exists(journal) else journal
    if is_journal(storage_url):
        return os.path.abspath(os.path.expanduser(storage_url))
    if is_sql_journal(storage_url):
        return storage_url
    if _same_sqlite_file(storage_url, results_url):
        raise ValueError("--storage and --db name the same SQLite file: both have a `trials` table, so give Optuna "
                         "its own file (or leave --storage out: it then goes beside --db)")
    return storage_url


def is_journal(storage: str) -> bool:
    """Whether a --storage (or storage_url_for's answer) is a journal file's path rather than a database URL."""
    return storage.endswith(".journal") and "://" not in storage


SQL_JOURNAL = "journal:"


def is_sql_journal(storage: str) -> bool:
    """Whether a --storage names Optuna's journal in a PostgreSQL table (``journal:URL``, journal_sql.SqlLog)."""
    return storage.startswith(SQL_JOURNAL)


def database_url(storage: str) -> str:
    """The database URL of a ``journal:URL`` --storage."""
    return storage[len(SQL_JOURNAL):]


def check_storage(storage_url: str | None, results_url: str) -> None:
    """Checks Optuna's storage before `tunebench tune` writes anything: the URL (storage_url_for), a journal or
    SQLite file and folder it can write, a server that answers within the connect timeout (a connection made and
    closed, creating nothing). StoreError or ValueError says what is wrong."""
    import pathlib
    from sqlalchemy.engine import make_url
    from ..store.engine import check_reachable, check_writable_file
    url = storage_url_for(storage_url, results_url)
    if url is None:
        return
    if is_journal(url):
        check_writable_file(pathlib.Path(url), "the Optuna journal")
        return
    if is_sql_journal(url):
        url = database_url(url)     # a PostgreSQL URL (TuneOptions.validate): the server must answer, as below
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        check_reachable(url, f"the Optuna storage {hide_password(url)}")
    elif parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        check_writable_file(pathlib.Path(os.path.abspath(parsed.database)), "the Optuna storage")


def retry_once(study, trial) -> None:
    """Called for a trial that a dead run left RUNNING, once it is failed (by Optuna's heartbeat check, or by
    SharedStudy.fail_dead_owners): its config is queued again, unless the trial was itself such a retry. A config that
    takes its run down every time then costs two runs, not all of them (SharedStudy.lost_verdicts records it crashed).
    Unlike Optuna's RetryFailedTrialCallback, the copy carries no user attributes: the dead run's "host" on a
    queued trial would have it failed again as soon as it is popped."""
    import optuna
    # A queued config (DEFAULT, the grid) is retried whole even if the run died before or while writing its
    # parameters; a sampled one with those it wrote (the sampler draws the rest), and not at all if it wrote none.
    params = trial.system_attrs.get("fixed_params") or trial.params
    if "retry_of" in trial.system_attrs or not params:
        return
    distributions = dict(trial.distributions)
    if set(params) - set(distributions):  # the distributions of the parameters it did not write: another trial's
        for other in study.get_trials(deepcopy=False):
            distributions = {**other.distributions, **distributions}
            if set(params) <= set(distributions):
                break
        else:
            return  # none known (no trial wrote them): the config is not retried
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params=params,
                                              distributions={name: distributions[name] for name in params},
                                              system_attrs={"retry_of": trial.number}))


def _write_ahead(engine) -> None:
    """Optuna commits every attribute, parameter and state on its own, and one process's loop runs all its GPUs'
    trials: with SQLite's default journal each commit waits for an fsync (about 15 ms on a CI disk, a dozen per
    trial). In WAL mode with synchronous=NORMAL a commit is durable against a killed process without one."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, connection_record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    engine.dispose()  # the connections Optuna opened while creating its tables reopen with the pragmas


def _lost_creation_race(error: Exception) -> bool:
    """Optuna creates its tables check-then-create: processes starting at once on a new PostgreSQL database race,
    and the losers fail with a unique violation (or 'already exists'). Opening again then finds the tables."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError
    return isinstance(error, (IntegrityError, ProgrammingError)) or "already exists" in str(error)


def _same_sqlite_file(url_a: str, url_b: str) -> bool:
    from sqlalchemy.engine import make_url
    a, b = make_url(url_a), make_url(url_b)
    if a.get_backend_name() != "sqlite" or b.get_backend_name() != "sqlite" or not a.database or not b.database:
        return False
    return os.path.abspath(a.database) == os.path.abspath(b.database)


def hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    if is_sql_journal(url):
        return SQL_JOURNAL + hide_password(database_url(url))
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide, and the error says what is wrong with it
        return url


def describe_storage(storage) -> str:
    if getattr(storage, "path", None) is not None:
        return storage.path     # a journal file
    url = getattr(storage, "url", None)
    return "memory" if url is None else hide_password(url)


def study_name(device, kernel: str, shash: str, problem: Problem) -> str:
    """The study of one device x kernel identity x bucket, named to read in optuna-dashboard:
    `flash_v2/bfloat16/D128/causal/B4-H32x8-N4096 @ NVIDIA H200 #1a2b3c4d`.

    It is built from bucket_key (so every field that tells two buckets apart is in it; the lengths read N4096 when
    Nq == Nk). The suffix is the kernel identity's first 8 hex digits: Optuna's study names are unique, and a resumed
    study must hold trials of the same code, so two identities need two names. The whole identity is the study's
    user attribute `kernel_identity`, which open_study checks when it resumes one."""
    _, dtype, d, causal, *sizes = bucket_key(problem).split("|")
    return f"{kernel}/{dtype}/{d}/{causal}/{_sizes_label(sizes)} @ {device.name} #{shash[:8]}"


def _sizes_label(sizes: list[str]) -> str:
    """['B4', 'H32/8', 'Nq4096', 'Nk4096'] -> 'B4-H32x8-N4096' (no '/', which separates the name's parts)."""
    sizes = [s.replace("/", "x") for s in sizes]
    nq = next((s for s in sizes if s.startswith("Nq")), None)
    nk = next((s for s in sizes if s.startswith("Nk")), None)
    if nq is not None and nk is not None and nq[2:] == nk[2:]:
        sizes = [f"N{nq[2:]}" if s == nq else s for s in sizes if s != nk]
    return "-".join(sizes)


def study_attributes(device, shash: str, problem: Problem) -> dict:
    """What a study's name abbreviates, as user attributes (optuna-dashboard shows them)."""
    return {"kernel_identity": shash, "kernel": problem.kernel, "device": device.name, "bucket": bucket_key(problem)}


def open_study(storage, sampler, device, shash: str, problem: Problem):
    """Creates the problem's study, or loads it to resume. A study of that name whose `kernel_identity` is another
    (two identities sharing a hash prefix) is refused, never resumed: its trials measured other code."""
    import optuna
    name = study_name(device, problem.kernel, shash, problem)
    study = optuna.create_study(storage=storage, sampler=sampler, study_name=name, direction="minimize",
                                load_if_exists=True)
    found = study.user_attrs.get("kernel_identity")
    if found is not None and found != shash:
        raise RuntimeError(f"the Optuna study {name!r} holds trials of kernel identity {found}, not {shash}: "
                           f"delete that study, or tune into another --storage")
    if found is None:
        for key, value in study_attributes(device, shash, problem).items():
            study.set_user_attr(key, value)
    return study


def record_winner(study, winner: dict) -> None:
    """The store's winner of this study's bucket, as the study's user attribute `winner`, so that optuna-dashboard
    shows the config the dispatcher runs (Optuna's own best_trial is the fastest single trial, before re-timing)."""
    study.set_user_attr("winner", winner)


def make_sampler(options: "TuneOptions", budget: int, admitted_share: float = 1.0, avoid=None):
    """``avoid``: an Avoid for TPE (None: none), ``admitted_share``: of SPACE, for tpe_startup."""
    import optuna
    if options.sampler == "grid":
        # Grid configs are enqueued explicitly (Search.enqueue), so this sampler only runs should the queue be
        # emptied by another process sharing the study.
        return seeded_per_trial(lambda seed: optuna.samplers.RandomSampler(seed=seed), options.seed)
    return seeded_per_trial(lambda seed: avoiding_tpe(avoid)(
        seed=seed, multivariate=True, constant_liar=True, n_startup_trials=tpe_startup(budget, admitted_share)),
        options.seed)


def tpe_startup(budget: int, admitted_share: float = 1.0) -> int:
    """TPE's random start: a third of the budget, 2 to 10 trials, DEFAULT first. The start is queued, drawn among
    the configs keep() admits (enqueue.random_start, ``admitted_share`` of SPACE), so it is as long as the start of
    TPE's own draws over all of SPACE evaluated in expectation: DEFAULT and the admitted share of the rest (those
    draws that keep() rejected counted as start trials too, and TPE then had more trials of its own)."""
    start = min(10, max(2, budget // 3))
    return 1 + max(1, round((start - 1) * admitted_share))


class Avoid:
    """The configs TPE should not propose: ``refuses(config)`` for configs evaluated, running or rejected by keep()
    (SPACE: to read TPE's samples, category indices in SPACE's order, suggest_config's)."""

    def __init__(self, space: dict, refuses):
        self.space, self.refuses = space, refuses

    def mask(self, samples: dict) -> list[bool] | None:
        """Per sample (parameter -> indices), whether it is refused; None for samples of other parameters than
        SPACE's (TPE's independent sampling of one parameter, before its joint search space is known)."""
        if set(samples) != set(self.space):
            return None
        n = len(next(iter(samples.values())))
        return [self.refuses({name: values[int(samples[name][i])] for name, values in self.space.items()})
                for i in range(n)]


def avoiding_tpe(avoid: Avoid | None):
    """TPESampler, or one that proposes, of the n_ei_candidates configs it samples, the best by its acquisition that
    ``avoid`` does not refuse (TPE's own choice where it refuses all). TPE alone proposed a config evaluated already
    or one keep() rejects in more than half its asks after the start (each an ask, a tell, and for a rejected
    config a store row: ~1 ms of the parent's CPU, which feeds every GPU); choosing among samples it drew anyway
    costs ~24 lookups. bench/propose_replay.py compares the configs found (TPESampler._compute_acquisition_func,
    optuna 5.1; without it this is TPE)."""
    import numpy as np
    from optuna.samplers import TPESampler
    if avoid is None:
        return TPESampler

    class AvoidingTPE(TPESampler):
        def _compute_acquisition_func(self, samples, mpe_below, mpe_above):
            values = super()._compute_acquisition_func(samples, mpe_below, mpe_above)
            refused = avoid.mask(samples)
            if refused is None or all(refused):
                return values
            return np.where(np.asarray(refused), -np.inf, values)

    return AvoidingTPE


def seeded_per_trial(make, seed: int):
    """A sampler whose random draws for trial n come from ``make(seed + n)``. Processes sharing a study (hosts, or
    runs resumed) hold copies of one seeded sampler: with one random state they would all propose the same configs
    in lock step, and all but one of each would be a duplicate. Trial numbers are handed out by the storage, one per
    trial, so the draws differ between processes, and a single run is still reproducible from --seed."""
    from optuna.samplers import BaseSampler

    class SeededPerTrial(BaseSampler):
        def __init__(self):
            self.sampler = make(seed)

        def before_trial(self, study, trial):
            if not reseed(self.sampler, seed + trial.number):
                self.sampler = make(seed + trial.number)
            self.sampler.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.sampler.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.sampler.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.sampler.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.sampler.after_trial(study, trial, state, values)

        def reseed_rng(self):
            self.sampler.reseed_rng()

    return SeededPerTrial()


def reseed(sampler, seed: int) -> bool:
    """Gives a TPESampler or RandomSampler the random state that a new one made with ``seed`` has, in place; False
    for another kind (then make a new one). Making a TPESampler per trial cost ~0.2 ms (warnings included), and threw
    away its search-space cache (an IntersectionSearchSpace that reads only trials added since its last look; a fresh
    one compared every trial's distributions, a third of an ask's CPU at ~50 trials). Private attributes (optuna
    5.1: TPESampler._rng and ._random_sampler, RandomSampler._rng, LazyRandomState): tests/test_tuner.py checks that
    a reseeded sampler proposes what new ones do."""
    from optuna.samplers import RandomSampler, TPESampler
    try:
        from optuna.samplers._lazy_random_state import LazyRandomState
    except ImportError:
        return False
    if isinstance(sampler, TPESampler):     # avoiding_tpe's too: it adds no state
        owners = [sampler, getattr(sampler, "_random_sampler", None)]
    elif type(sampler) is RandomSampler:
        owners = [sampler]
    else:
        return False
    states = [getattr(owner, "_rng", None) for owner in owners]
    if not all(isinstance(state, LazyRandomState) for state in states):
        return False
    for state in states:
        state.rng.seed(seed)
    return True


def quiet_optuna() -> None:
    """Optuna warns that heartbeats and multivariate TPE are experimental, and that heartbeats are meant for
    Study.optimize: the tuner uses ask/tell (to run trials in its own workers) and records heartbeats itself."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


"""`tunebench tune`: an Optuna search per problem, over configs compiled, checked and timed in worker processes.

One study per device x kernel x kernel source hash x bucketed problem, in Optuna's own RDB storage (--storage URL,
else an SQLite file next to the results database), so that a stopped run resumes and several processes or hosts
share studies. Every trial is also recorded in the results store, and each problem's winner is upserted there (a
faster time replaces a slower one, never the reverse).

The search:
- SPACE becomes Optuna suggestions in exactly one place, ``suggest_config``.
- A config that ``keep`` rejects is told PRUNED (with the reason) and recorded as pruned: it never reaches a compiler.
- TPE (seeded, multivariate, constant liar) by default. The DEFAULT config is enqueued as the first trial, so every
  problem has a baseline and TPE a known-good start. --trials counts *evaluated* configs: pruned configs and repeats
  of a config already evaluated do not count (a repeat is told the earlier result, not run again), but the sampler
  may be asked at most 4 x trials + 20 times, so a sampler that keeps proposing such configs ends the search early.
- --sampler grid is exhaustive over what keep admits: every config of SPACE not yet in the study is enqueued, DEFAULT
  first and the rest shuffled by --seed (rejected ones are told pruned), up to --trials evaluations; a lookahead's
  worth at a time (Search.top_up), since every ask reads the whole queue. Enqueued trials are Optuna's own queue,
  which processes sharing the study pop without overlap.
- Resume: the study's finished trials (evaluated or pruned) are never run again and count toward --trials. Trials a
  killed run left RUNNING are failed at once if that run was on this host and its process is gone, else by Optuna's
  heartbeat (RDB storage) once stale; each such config is queued again once, and recorded crashed if it is lost a
  second time. A result that reached the store before its run died is kept, not run again.
- Compile ahead: configs are asked a few at a time; compile workers (CPU-bound, one per spare core, up to 8 per GPU
  runner, so that two GPUs are fed twice the compiles) put them into Triton's on-disk cache while the GPU workers
  check and time earlier ones. A runner takes the first asked config whose compile has finished (or failed: the
  runner then meets the error itself and classifies it). Not under --interpret, where there is nothing to compile.
- At the end of a problem the best few ok configs and DEFAULT are re-timed against each other in interleaved rounds
  (each round times every finalist on one GPU; one runner takes them all, except for the last problem, whose rounds
  are shared among the runners idle then), in the background while the next problem's search starts; the winner is
  the fastest by the median of its rounds (finalists whose rounds overlap the leader's get two rounds more), and its
  speedup over DEFAULT comes from the same rounds. Problems whose timings take longest are tuned first (schedule),
  so that the last re-timing is short. A runner builds a problem's inputs and references as soon as the problem
  starts. Once a problem has only compiled configs left to run and a worker is idle, the next problem starts, and
  the last configs run in its background, before its own (Search.hand_off).
- $TUNEBENCH_TRACE=FILE writes the run's timeline (tunebench/trace.py; bench/trace_summary.py reads it).

Many GPUs and hosts:
- --workers N: one runner process per GPU (CUDA_VISIBLE_DEVICES pinned per runner; under --interpret, N CPU runners),
  fed by this process's one loop and shown in its one progress display; each trial goes to whichever runner is idle.
- Processes sharing a study (--storage URL, e.g. PostgreSQL, on several hosts) share its budget and never run one
  config twice, through Optuna's storage alone (Search.sync, Search.next_ready): trials finished elsewhere count and
  are not re-run; of the trials for one config the lowest-numbered runs and the others stand down; a trial whose
  lower-numbered peers already fill the budget stands down. A process with nothing left to ask waits for the others'
  open trials; those of a process that died go stale after the grace period, are failed, and are asked again.
- Each trial records its process ("host": hostname:pid) and runner ("runner": run1:gpu1) as user attributes.
"""
from __future__ import annotations

import bisect
import contextlib
import math
import os
import random
import signal
import socket
import statistics
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from .registry import KERNELS, kernel_module, kernel_identity
from .shapes import Problem, bucket_key, preset_problems, suite
from .workers import Compile, Event, Identify, Outcome, Retime, Run, Setup, Worker
from . import timing, trace

DEFAULT_TRIALS = 24
TOP_K = 3                       # finalists re-timed against each other (plus DEFAULT)
RETIME_ROUNDS = 3
RETIME_ROUNDS_INTERPRET = 2
EXTRA_ROUNDS = 2                # more rounds for the finalists whose rounds overlap the leader's (timing.contenders)
EXTRA_ROUNDS_INTERPRET = 0      # wall-clock rounds on a CPU: none (they would say nothing about a GPU's ranking)
REFILL_SYNC_S = 0.5             # refill reads the study at most this often (dispatch reads it before each run)
TPE_AHEAD = 2                   # TPE configs asked ahead of each runner once the random start is done
ASK_FACTOR, ASK_SLACK = 4, 20   # TPE: at most ASK_FACTOR x trials + ASK_SLACK asks per problem and run
MAX_COMPILE_WORKERS = 8         # per runner: two GPUs take twice the compiles per second
HEARTBEAT_S = 30                # Optuna trial heartbeat; a trial silent for GRACE_S is stale (its run died)
GRACE_S = 120                   # both can be set (whole seconds) by $TUNEBENCH_HEARTBEAT_S and $TUNEBENCH_GRACE_S
SETUP_TIMEOUT_S = 600.0         # building a problem's inputs and float64 reference in a worker
STORAGE_OPEN_TRIES = 3
HOST = f"{socket.gethostname()}:{os.getpid()}"
CHOOSING_POLL_S = 0.05
ASK_BATCH = 2                   # configs asked per turn of the loop: replies are read in between (at a problem's start
                                # a runner set up waited ~0.5 s for the 18 asks of an H200 pair's lookahead)
POLL_S = 2.0                    # how often a run with nothing left to do looks at other processes' open trials
NO_GPU = ("no GPU: CUDA is not available here. Use `tunebench tune --interpret` to run the whole pipeline on the CPU "
          "under the Triton interpreter (a test of the pipeline, not a speed measurement), or run on a GPU machine")


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

    @classmethod
    def from_args(cls, args) -> "TuneOptions":
        return cls(trials=args.trials, timeout=args.timeout, sampler=args.sampler, seed=args.seed, db=args.db,
                   storage=args.storage, workers=args.workers, interpret=args.interpret,
                   compile_workers=getattr(args, "compile_workers", None),
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
    database before it opens the storage): not a URL, an unknown dialect, or an SQLite file in a missing folder."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError, ImportError) as e:
        raise ValueError(f"--storage is not a database URL that SQLAlchemy can use: {_hide_password(url)} "
                         f"({type(e).__name__}: {e})") from None
    path = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if path and path != ":memory:" and not path.startswith("file:"):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"--storage names an SQLite file in a folder that does not exist: {folder}")


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be a whole number of seconds, got {value!r}") from None


@dataclass
class ProblemResult:
    problem: Problem
    config: dict | None = None
    median_ms: float | None = None
    default_ms: float | None = None
    speedup: float | None = None
    counts: dict = field(default_factory=dict)  # status -> distinct configs, over the whole study
    wall_s: float = 0.0
    written: bool = False                       # False: the store kept a faster earlier winner
    note: str = ""


# -- the command


def tune_command(args) -> int:
    options = TuneOptions.from_args(args)
    problems = select_problems(args.kernel, args.suite, args.preset, args.interpret)
    results: list[ProblemResult] = []
    start = time.monotonic()
    try:
        tune(problems, options, results=results)
    finally:
        if results:
            print(summary(results, time.monotonic() - start, options.interpret))
    missing = [r for r in results if r.config is None]
    if missing:
        print(f"tunebench tune: {len(missing)} of {len(results)} problems have no winner (no config passed)",
              file=sys.stderr)
        return 1
    return 0


def select_problems(kernels: list[str] | None, suite_name: str | None, preset: str | None,
                    interpret: bool) -> list[Problem]:
    """The problems to tune: a suite (default 'default', or 'tiny' under --interpret) or a model preset, filtered by
    kernel, one per bucket (the store keeps one winner per bucket)."""
    if suite_name and preset:
        raise ValueError("give --suite or --preset, not both")
    if preset:
        problems = preset_problems(preset, dtype="float16" if interpret else "bfloat16")
    else:
        problems = suite(suite_name or ("tiny" if interpret else "default"))
    if kernels:
        problems = [p for p in problems if p.kernel in kernels]
    if interpret:
        dropped = [p for p in problems if p.dtype == "bfloat16"]
        if dropped:
            print(f"tunebench tune: skipping {len(dropped)} bfloat16 problems: the Triton interpreter computes "
                  f"bf16 wrongly (tune them on a GPU)", file=sys.stderr)
        problems = [p for p in problems if p.dtype != "bfloat16"]
    if not problems:
        raise ValueError("no problems selected: check --kernel against the suite or preset")
    by_bucket: dict[str, Problem] = {}
    for p in problems:
        by_bucket.setdefault(bucket_key(p), p)
    if len(by_bucket) < len(problems):
        print(f"tunebench tune: {len(problems) - len(by_bucket)} problems share a bucket with an earlier one and are "
              f"skipped (one winner is stored per bucket)", file=sys.stderr)
    return list(by_bucket.values())


def tune(problems: list[Problem], options: TuneOptions, *, results: list[ProblemResult] | None = None,
         err=None, fleet: Fleet | None = None) -> list[ProblemResult]:
    """Tunes each problem in turn and returns (and appends to ``results``, as they finish) one result per problem.
    ``fleet``: worker processes already started (and left running) by the caller, for experiments that tune the same
    problems many times (bench/search_efficiency.py); by default the run starts and stops its own."""
    options.validate()
    err = err or sys.stderr
    results = [] if results is None else results
    first, lent = len(results), fleet is not None
    # An own fleet's workers start first: they import torch and triton while this process does the same and opens
    # its databases (this process has not imported torch yet where CUDA_VISIBLE_DEVICES names the GPUs).
    with interpreting(options.interpret), contextlib.nullcontext(fleet) if lent else Fleet(options).starting() as fleet:
        if not options.interpret:
            require_gpu()
        trace.event("gpu_checked")
        from .store import Store
        with Store(options.db) as store, warnings.catch_warnings():
            _quiet_optuna()
            storage = open_storage(options.storage, store.url, options.heartbeat_s, options.grace_s)
            print(f"tunebench tune: results in {store.where}, studies in {_describe_storage(storage)}", file=err)
            trace.event("tune", workers=options.workers, problems=len(problems))
            for kernel in dict.fromkeys(p.kernel for p in problems):
                kernel_module(kernel)  # and triton: imported while the workers start, not once they are ready
            trace.event("kernels_imported")
            fleet.await_ready()
            trace.event("fleet_ready", runners=len(fleet.runners), compilers=len(fleet.compilers))
            device = fleet.identify()
            trace.event("identified")
            try:
                for index, problem in enumerate(schedule(problems)):
                    trace.event("problem", index=index, label=problem.label())
                    search = Search(problem, options, store, storage, fleet, device,
                                    Progress(err, index, len(problems), problem))
                    # Its result arrives once its finalists are re-timed: in the background of the next search.
                    search.tune(results.append, last=index == len(problems) - 1)
                fleet.drain()
            except BaseException:
                for tail in list(fleet.tails):  # trials still finishing in the background: a later run runs them
                    tail.abandon(replace_busy=False)
                if lent:  # a caller's fleet must not hold replies meant for this run (an own fleet is closed now)
                    fleet.cancel_background()
                raise
            finally:
                order = {id(p): i for i, p in enumerate(problems)}
                results[first:] = sorted(results[first:], key=lambda r: order.get(id(r.problem), len(problems)))
    trace.event("fleet_closed")
    return results


def schedule(problems: list[Problem]) -> list[Problem]:
    """The order the problems are tuned in: those whose timings take longest first (timing.typical_s), else as given
    (the results come back in the given order). Each problem's finalists are re-timed in the background of the next
    problem's search, but nothing overlaps the last problem's re-timing, so that one should be short: on an H200 pair
    a paged decode problem's (graph replays, ~1 s a timing) held both GPUs for the last 7.9 s of a 135 s run, where a
    flash problem's takes about 1 s."""
    return sorted(problems, key=lambda p: -timing.typical_s(p.paged))


def _quiet_optuna() -> None:
    """Optuna warns that heartbeats and multivariate TPE are experimental, and that heartbeats are meant for
    Study.optimize: the tuner uses ask/tell (to run trials in its own workers) and records heartbeats itself."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


@contextlib.contextmanager
def interpreting(interpret: bool):
    """TRITON_INTERPRET as the workers will have it, while tuning: keep() reads it (no TMA under the interpreter), and
    the parent must prune exactly what the workers could not run."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def require_gpu() -> None:
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError(NO_GPU)


# -- Optuna: storage, studies, the one place SPACE becomes suggestions


def suggest_config(trial, space: dict) -> dict:
    """The one place SPACE becomes Optuna suggestions: one categorical per key, in SPACE's order."""
    return {name: trial.suggest_categorical(name, list(values)) for name, values in space.items()}


def config_key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


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
    """Optuna's RDB storage: --storage, else an SQLite file next to an SQLite results database (results.db ->
    results.optuna.db; the two cannot share a file, both have a `trials` table); memory for a memory database.
    On PostgreSQL they can share a database: the store keeps its tables in a schema of their own."""
    import optuna
    from sqlalchemy.engine import make_url
    if storage_url is None:
        url = make_url(results_url)
        if url.get_backend_name() != "sqlite" or (url.database or "").startswith("file:"):
            raise ValueError(f"give --storage URL for Optuna's studies: only an SQLite --db gets one beside it "
                             f"(--db is {url.render_as_string(hide_password=True)})")
        if url.database in (None, "", ":memory:"):
            return optuna.storages.InMemoryStorage()
        path = os.path.abspath(url.database)
        storage_url = "sqlite:///" + os.path.splitext(path)[0] + ".optuna.db"
    elif _same_sqlite_file(storage_url, results_url):
        raise ValueError("--storage and --db name the same SQLite file: both have a `trials` table, so give Optuna "
                         "its own file (or leave --storage out: it then goes beside --db)")
    sqlite = storage_url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
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
            raise RuntimeError(f"cannot open the Optuna storage {_hide_password(storage_url)}: "
                               f"{type(e).__name__}: {e}") from e


def retry_once(study, trial) -> None:
    """Called for a trial that a dead run left RUNNING, once it is failed (by Optuna's heartbeat check, or by
    Search.fail_dead_owners): its config is queued again, unless the trial was itself such a retry. A config that
    takes its run down every time then costs two runs, not all of them (Search.lost_verdicts records it crashed).
    Unlike Optuna's RetryFailedTrialCallback, the copy carries no user attributes: the dead run's "host" on a
    queued trial would have it failed again as soon as it is popped."""
    import optuna
    if "retry_of" in trial.system_attrs or not trial.params:
        return
    # A queued config (DEFAULT, the grid) is retried whole even if the run died while writing its parameters.
    params = trial.system_attrs.get("fixed_params") or trial.params
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


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide, and the error says what is wrong with it
        return url


def _describe_storage(storage) -> str:
    url = getattr(storage, "url", None)
    return "memory" if url is None else _hide_password(url)


def study_name(device, kernel: str, shash: str, problem: Problem) -> str:
    return f"{device.name}|{kernel}|{shash}|{bucket_key(problem)}"


def make_sampler(options: TuneOptions, budget: int):
    import optuna
    if options.sampler == "grid":
        # Grid configs are enqueued explicitly (Search.enqueue), so this sampler only runs should the queue be
        # emptied by another process sharing the study.
        return seeded_per_trial(lambda seed: optuna.samplers.RandomSampler(seed=seed), options.seed)
    return seeded_per_trial(lambda seed: optuna.samplers.TPESampler(
        seed=seed, multivariate=True, constant_liar=True, n_startup_trials=tpe_startup(budget)), options.seed)


def tpe_startup(budget: int) -> int:
    """TPE's random start: a third of the budget, 2 to 10 trials."""
    return min(10, max(2, budget // 3))


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


# -- worker processes


class Fleet:
    """The run's worker processes: `runners` check and time trials (one per GPU, pinned with CUDA_VISIBLE_DEVICES,
    or CPU interpreter workers), `compilers` fill Triton's cache ahead of them."""

    def __init__(self, options: TuneOptions):
        n = options.workers
        if options.interpret:
            # Nothing to compile ahead under the interpreter, unless asked for (the tests do, to run the scheduling
            # of compile workers on a CPU: there, Triton's warmup returns without running the kernel).
            devices, threads, n_compile = [None] * n, max(1, (os.cpu_count() or 1) // n), options.compile_workers or 0
        else:
            devices, threads = visible_devices(n), 4
            n_compile = options.compile_workers
            if n_compile is None:
                n_compile = min(MAX_COMPILE_WORKERS * n, max(0, (os.cpu_count() or 1) - n - 1))
        self.runners = [Worker("run", options.interpret, d, threads, options.setup_timeout, name=f"run{i}")
                        for i, d in enumerate(devices)]
        # Spread over the GPUs: each compile worker holds a CUDA context (its inputs' shapes and alignment are real
        # tensors), and the driver creates one context at a time per GPU.
        self.compilers = [Worker("compile", options.interpret, devices[i % n], 1, options.setup_timeout,
                                 name=f"compile{i}")
                          for i in range(n_compile)]
        self.workers = self.runners + self.compilers
        # Requests outside the search that the fleet is serving (a finished problem's finalists being re-timed while
        # the next problem's search runs), and what to do with each reply.
        self.background: dict[Worker, Callable[[Event], None]] = {}
        # Searches handed off (Search.hand_off), oldest first: their last configs go to idle runners before the
        # current search's (serve_tails), their replies come back as background ones, their trials get heartbeats.
        self.tails: list = []

    def __enter__(self) -> "Fleet":
        try:
            self.start()
            self.await_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def starting(self):
        """The fleet with its processes spawned, not yet awaited: they import torch and triton (4-5 s for 18 workers
        on an H200 pair) while the caller does other work, then call ``await_ready``. Closed on leaving."""
        try:
            self.start()
            yield self
        finally:
            self.close()

    def start(self) -> None:
        for w in self.workers:
            if w.process is None:
                w.start()

    def await_ready(self) -> None:
        try:
            for w in self.workers:
                if not w.ready:
                    w.await_ready()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.background.clear()
        self.tails.clear()
        for w in self.workers:
            w.ask_to_exit()
        for w in self.workers:
            if w.process is not None:
                w.close()

    def identify(self):
        """The device every runner sees (read in the workers: the parent never initialises a CUDA context)."""
        identities = []
        for w in self.runners:
            event = w.call(Identify(), timeout=120.0)
            if event.kind != "ok":
                raise RuntimeError(f"cannot read the device identity in worker {w.name}: {event.message}")
            identities.append(event.value)
        if len({d.name for d in identities}) > 1:
            raise RuntimeError(f"--workers needs one kind of GPU, found {sorted({d.name for d in identities})}: "
                               f"choose them with CUDA_VISIBLE_DEVICES")
        return identities[0]

    def submit_background(self, worker: Worker, request, timeout: float, on_reply: Callable[[Event], None]) -> None:
        """Sends a request whose reply goes to ``on_reply`` (called from ``wait``) rather than to the search."""
        worker.submit(request, timeout)
        self.background[worker] = on_reply

    def idle_runners(self, loaded: tuple | None = None) -> list[Worker]:
        """The idle runners, those that have ``loaded`` (problem, seed) set up first; waits for one if none is."""
        while True:
            idle = [w for w in self.runners if not w.busy]
            if idle:
                return sorted(idle, key=lambda w: w.loaded != loaded)
            self._wait_background()  # every runner serves a background request

    def serve_tails(self) -> None:
        """Gives idle runners the configs that handed-off searches have left to run, oldest search first."""
        for tail in list(self.tails):
            tail.dispatch_late()

    def drain(self) -> None:
        """Waits for every background request to be answered, and for the handed-off searches to finish."""
        while self.background or self.tails:
            self.serve_tails()
            if self.background:
                self._wait_background()
            elif self.tails:  # held back by a trial elsewhere still writing its config (Search.next_ready)
                time.sleep(CHOOSING_POLL_S)

    def _wait_background(self) -> None:
        """Waits for replies when only background requests are out: any other reply would have no one to take it."""
        for worker, event in self.wait(timeout=60.0):
            raise RuntimeError(f"{worker.name} replied to no one: {event}")

    def cancel_background(self) -> None:
        for worker in list(self.background):
            worker.cancel()
        self.background.clear()
        self.tails.clear()

    def wait(self, timeout: float) -> list[tuple[Worker, Event]]:
        """Waits until a busy worker replies or reaches its deadline (or ``timeout``); returns what happened, less the
        replies to background requests, which go to their handlers."""
        from multiprocessing.connection import wait as wait_for_connections
        busy = [w for w in self.workers if w.busy]
        if not busy:
            return []
        now = time.monotonic()
        soonest = min(w.deadline for w in busy)
        ready = wait_for_connections([w.conn for w in busy], max(0.0, min(timeout, soonest - now)))
        events = []
        for w in busy:
            if w.conn in ready:
                event = w.receive()
            elif time.monotonic() >= w.deadline:
                event = w.expire()
            else:
                continue
            if event is None:
                continue
            if w in self.background:
                self.background.pop(w)(event)
            else:
                events.append((w, event))
        return events


def visible_devices(n: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES values for n workers, one GPU each, from what this process may see: the variable's own
    list where it is set (without importing torch), else torch's device count."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        ids = [d.strip() for d in listed.split(",") if d.strip()]
    else:
        require_gpu()
        import torch
        ids = [str(i) for i in range(torch.cuda.device_count())]
    if n > len(ids):
        raise ValueError(f"--workers {n} needs {n} GPUs, but {len(ids)} are visible")
    return ids[:n]


# -- one problem's search


@dataclass
class Seen:
    """A config whose trial finished in this study: it is never run again."""
    config: dict
    status: str
    number: int
    median_ms: float | None


@dataclass
class Candidate:
    """An asked trial waiting for (or in) a worker."""
    trial: object               # optuna.Trial
    config: dict
    key: tuple
    compiled: bool              # in Triton's cache already (or there is no compile worker)
    started_at: datetime | None = None
    runner: str = ""            # the worker that ran it, and its GPU (CUDA_VISIBLE_DEVICES): "run1:gpu1"


class ProblemFailed(RuntimeError):
    """The problem cannot be tuned in this run (its inputs could not be set up in a worker)."""


class Search:
    """The trials of one problem: ask, prune, compile ahead, check and time, tell; then confirm the winner."""

    def __init__(self, problem: Problem, options: TuneOptions, store, storage, fleet: Fleet, device,
                 progress: "Progress"):
        import optuna
        self.problem, self.options, self.store, self.fleet, self.device = problem, options, store, fleet, device
        self.progress = progress
        self.kernel = problem.kernel
        self.module_path = KERNELS[self.kernel]
        self.module = kernel_module(self.kernel)
        self.hash = kernel_identity(self.kernel)
        self.space = self.module.SPACE
        # keep() once per config of SPACE: the reason it is rejected for this problem, or None
        self.reasons = {config_key(c): self.reject_reason(c) for c in all_configs(self.space)}
        admitted = sum(1 for reason in self.reasons.values() if reason is None)
        limit = admitted if options.sampler == "grid" else DEFAULT_TRIALS
        self.budget = min(options.trials or limit, admitted)
        self.study = optuna.create_study(storage=storage, sampler=make_sampler(options, self.budget),
                                         study_name=study_name(device, self.kernel, self.hash, problem),
                                         direction="minimize", load_if_exists=True)
        self.heartbeats = hasattr(storage, "record_heartbeat") and storage.get_heartbeat_interval() is not None
        self.storage = storage
        optuna.storages.fail_stale_trials(self.study)
        self.open: dict[int, object] = {}   # trial number -> optuna.Trial asked and not yet told
        self.seen: dict[tuple, Seen] = {}
        self.elsewhere: dict[tuple, int] = {}   # config -> the lowest trial running or queued for it elsewhere
        self.choosing: list[int] = []           # trials elsewhere still writing their config
        self.claims: list[int] = []             # see sync
        self.live_elsewhere = 0                 # trials asked and not yet told by other processes
        self.adopted: set[int] = set()          # their trial ids given one heartbeat from here (adopt_orphans)
        self.looked_up: set[int] = set()        # failed trials whose verdict was looked for in the store
        self.found_lost: dict[tuple, Seen] = {}  # the verdicts found for them (lost_verdicts)
        self.retries: set[int] = set()          # retries queued by retry_once that this run has counted
        self.max_asks = 0                       # set by enqueue, after the first sync
        self.unqueued: list[dict] = []          # grid configs to queue (top_up)
        self.queued_ahead = 0                   # configs this run queued and has not asked for yet
        self.synced_at = 0.0                    # when sync last read the study
        self.sync()
        trace.event("study_loaded")
        self.pending: list[Candidate] = []
        self.running: dict[Worker, Candidate] = {}
        self.finishing: set[tuple] = set()      # configs run, their results not yet written (step)
        self.compiling: dict[Worker, Candidate] = {}
        self.preparing: set[Worker] = set()
        if self.evaluated() + self.live_elsewhere < self.budget:
            # Trials are to run here: the idle runners build the inputs and references while this process fills
            # Optuna's queue and asks for the first configs (those that an earlier problem leaves idle).
            self.fleet.serve_tails()
            for worker in self.fleet.runners:
                if not worker.busy:
                    self.prepare(worker)
        self.asks = 0
        self.late_failures: list[str] = []      # handed-off trials that could not run (late_reply)
        self.last_beat = time.monotonic()
        self.wide = len(fleet.runners) + len(fleet.compilers)
        self.startup = self.budget if options.sampler == "grid" else tpe_startup(self.budget)
        with trace.span("enqueue"):
            self.max_asks = self.enqueue()

    # -- the study as it stands

    def load_seen(self, trials: list) -> dict[tuple, Seen]:
        from optuna.trial import TrialState
        seen: dict[tuple, Seen] = {}
        for t in trials:
            if not t.state.is_finished():
                continue
            status = t.user_attrs.get("status")
            state = {"ok": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(status, TrialState.FAIL)
            if (status is None or t.state != state or "duplicate_of" in t.user_attrs
                    or set(t.params) != set(self.space)):
                # No verdict (abandoned), or a run killed between writing the status and telling the state (then
                # failed as stale): it may run again.
                continue
            seen.setdefault(config_key(t.params), Seen(dict(t.params), status, t.number, t.value))
        for key, verdict in self.lost_verdicts(trials, seen).items():
            seen.setdefault(key, verdict)
        return seen

    def lost_verdicts(self, trials: list, seen: dict) -> dict[tuple, Seen]:
        """Verdicts for failed trials that Optuna holds none for: the store's, when the run recorded one there and
        died before telling Optuna (the store is written first), so the trial is not run again; and crashed (now
        recorded) for a retry that a dead run left behind as well (see retry_once). A trial this run looked up once
        is not looked up again: no one writes a verdict for a trial after it failed."""
        from optuna.trial import TrialState
        from .store import TrialResult
        lost = [t for t in trials if t.state == TrialState.FAIL and t.number not in self.looked_up
                and set(t.params) == set(self.space) and config_key(t.params) not in seen]
        if not lost:
            return self.found_lost
        self.looked_up.update(t.number for t in lost)
        # By number and config: trials of another study (an earlier --storage) may share this store's numbers.
        stored = {r.number: r for r in self.store.trials(self.device, self.kernel, self.hash, self.problem)}
        stored = {t.number: stored[t.number] for t in lost
                  if t.number in stored and stored[t.number].config == dict(t.params)}
        for t in lost:
            deliberate = "message" in t.user_attrs or "duplicate_of" in t.user_attrs  # told FAIL by a live run
            if t.number not in stored and "retry_of" in t.system_attrs and not deliberate:
                stored[t.number] = TrialResult(
                    t.number, dict(t.params), "crashed", message=f"its run died while it ran, twice (trials "
                    f"{t.system_attrs['retry_of']} and {t.number}): not run again")
                self.store.record_trial(self.device, self.kernel, self.hash, self.problem, stored[t.number])
            if t.number in stored:
                self.found_lost[config_key(t.params)] = Seen(dict(t.params), stored[t.number].status, t.number,
                                                             stored[t.number].median_ms)
        return self.found_lost

    def sync(self) -> None:
        """What every process sharing the study has done: trials finished elsewhere join ``seen`` (they count toward
        the budget and are never run again here); trials open elsewhere count as live. Their configs (parameters,
        or the fixed ones of a queued trial) go to ``elsewhere``, the lowest trial number for each; a RUNNING trial
        whose config is not all written yet is ``choosing``. ``claims``: the numbers of the trials that have, or may
        yet have, a verdict (evaluated ones, and all open or queued ones, ours too)."""
        with trace.span("sync"):
            self._sync()

    def _sync(self) -> None:
        from optuna.trial import TrialState
        self.synced_at = time.monotonic()
        trials = self.fail_dead_owners(self.study.get_trials(deepcopy=False))
        self.count_retries(trials)
        for key, seen in self.load_seen(trials).items():
            self.seen.setdefault(key, seen)
        unfinished = [t for t in trials if not t.state.is_finished()]
        self.claims = sorted({s.number for s in self.seen.values() if s.status != "pruned"}
                             | {t.number for t in unfinished})
        others = [t for t in unfinished if t.number not in self.open]
        running = [t for t in others if t.state == TrialState.RUNNING]
        self.live_elsewhere = len(running)
        self.elsewhere, self.choosing = {}, []
        for t in others:
            fixed = t.system_attrs.get("fixed_params") or {}
            config = t.params if set(t.params) == set(self.space) else fixed if set(fixed) == set(self.space) else None
            if config is not None:
                key = config_key(config)
                self.elsewhere[key] = min(self.elsewhere.get(key, t.number), t.number)
            elif t.state == TrialState.RUNNING:
                self.choosing.append(t.number)
        self.adopt_orphans(running)

    def fail_dead_owners(self, trials: list) -> list:
        """Fails at once the RUNNING trials of a run on this host whose process is gone (killed with kill -9, say),
        which the heartbeat would fail only a grace period later, with Optuna's stale-trial callback (retry_once)
        after each, as its heartbeat check does. Returns the study's trials as they now are."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState
        dead = [t for t in trials if t.state == TrialState.RUNNING and t.number not in self.open
                and owner_is_dead(t.user_attrs.get("host"))] if self.heartbeats else []
        if not dead:
            return trials
        callback = self.storage.get_heartbeat_stale_trial_callback()
        for t in dead:
            try:
                failed = self.storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # its owner finished it after all, or another process failed it first
            if failed and callback is not None:
                callback(self.study, self.storage.get_trial(t._trial_id))
        return self.study.get_trials(deepcopy=False)

    def count_retries(self, trials: list) -> None:
        """A retry queued after this run counted the queue (a process sharing the study died meanwhile) is one more
        ask this run may make: a grid search asks only for what is queued."""
        from optuna.trial import TrialState
        queued = {t.number for t in trials if t.state == TrialState.WAITING and "retry_of" in t.system_attrs}
        self.max_asks += len(queued - self.retries)
        self.retries |= queued

    def adopt_orphans(self, running: list) -> None:
        """One heartbeat from here for each trial of another process, the first time it is seen. A process killed
        between creating a trial and its first heartbeat leaves a RUNNING trial that Optuna never finds stale (it
        has none), and the other processes would wait for it forever; with one, it goes stale a grace period later
        unless its owner, alive, keeps it fresh."""
        if not self.heartbeats:
            return
        for t in running:
            if t._trial_id not in self.adopted:
                self.storage.record_heartbeat(t._trial_id)
                self.adopted.add(t._trial_id)

    def evaluated(self) -> int:
        return sum(1 for s in self.seen.values() if s.status != "pruned")

    def counts(self) -> dict[str, int]:
        return dict(Counter(s.status for s in self.seen.values()))

    def reject_reason(self, config: dict) -> str | None:
        try:
            return self.module.keep(config, self.problem)
        except Exception as e:  # a bug in keep: the config is not compiled, and the reason says why
            return f"keep() raised {type(e).__name__}: {e}"

    def enqueue(self) -> int:
        """Puts DEFAULT (and, for grid, every config not yet evaluated) into Optuna's queue, or into ``unqueued``
        for top_up to put there as asks use the queue up; returns how many asks this run may make."""
        from optuna.trial import TrialState
        waiting = {config_key(t.system_attrs.get("fixed_params") or t.params)
                   for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
        remaining = max(0, self.budget - self.evaluated() - self.live_elsewhere)
        if self.options.sampler == "grid":
            order = grid_order(self.space, self.module.DEFAULT, self.options.seed)
        else:
            order = [self.module.DEFAULT]
        fresh, seen_keys = [], set(self.seen) | waiting | set(self.elsewhere)
        admitted_slots = remaining - sum(1 for k in waiting if k in self.reasons and self.reasons[k] is None)
        for config in order:
            key = config_key(config)
            if key in seen_keys:
                continue
            seen_keys.add(key)
            if self.reasons.get(key, "not in SPACE") is None:
                if admitted_slots <= 0:
                    continue
                admitted_slots -= 1
            fresh.append(config)
        queued = len(waiting) + len(fresh)
        self.unqueued = fresh
        self.top_up()
        if self.options.sampler == "grid":
            return queued
        return queued + ASK_FACTOR * remaining + ASK_SLACK

    def top_up(self) -> None:
        """Moves the next configs of ``unqueued`` into Optuna's queue once this run's share of it is used up, a
        lookahead's worth at a time. Not all at once: every ask reads the whole queue (Optuna pops the first waiting
        trial it can claim), and with a grid of 105 configs queued an ask took 30 ms of the loop that feeds every GPU.
        A config that was evaluated, or queued or run elsewhere, since the grid was laid out is left out."""
        if self.queued_ahead > 0 or not self.unqueued:
            return
        chunk = []
        while self.unqueued and len(chunk) < max(1, self.lookahead()):
            config = self.unqueued.pop(0)
            key = config_key(config)
            if key not in self.seen and key not in self.elsewhere:
                chunk.append(config)
        for config in chunk:
            self.study.enqueue_trial(config)
        self.queued_ahead += len(chunk)

    # -- the loop

    def tune(self, deliver: Callable[[ProblemResult], None], last: bool = True) -> None:
        """Searches, then has the finalists re-timed in the background: ``deliver`` gets the result once they are
        (from Fleet.wait, during the next problem's search), or at once if there is nothing to re-time. ``last``: no
        problem follows, so nothing will overlap the re-timing (see confirm)."""
        start = time.monotonic()
        self.progress.begin(self.budget, self.evaluated(), self.counts())

        def done(result: ProblemResult) -> None:
            result.wall_s = time.monotonic() - start
            trace.event("confirmed", index=self.progress.index)
            self.progress.end(result)
            deliver(result)

        try:
            self.search(hand_off=not last)
        except ProblemFailed as e:
            done(ProblemResult(self.problem, counts=self.counts(), note=str(e)))
            return
        trace.event("searched", index=self.progress.index, running=len(self.running), pending=len(self.pending))
        if self.running or self.pending:
            self.hand_off(lambda: self.confirm(done, share=False))
        else:
            self.confirm(done, share=last)

    def search(self, hand_off: bool = False) -> None:
        """Until every trial is told, or (``hand_off``) until only compiled configs are left to run and a worker is
        idle: then the next problem starts (see hand_off)."""
        try:
            while self.step():
                if hand_off and self.tail():
                    break
        except ProblemFailed:
            self.abandon(replace_busy=True)  # the next problem must not receive this one's late replies
            raise
        except BaseException:
            self.abandon(replace_busy=False)  # the run is ending: the fleet closes its workers
            raise

    def step(self) -> bool:
        self.refill()
        self.dispatch()
        if not self.busy():
            if self.pending and all(w.busy for w in self.fleet.runners):
                # The runners re-time an earlier problem's finalists; with configs still to ask, only look.
                self.fleet.wait(timeout=0.0 if self.wants_more() else self.options.heartbeat_s)
                self.heartbeat()
                return True
            if self.pending:  # held back by a trial elsewhere that is still writing its config (next_ready)
                time.sleep(CHOOSING_POLL_S)
                self.heartbeat()
                return True
            return self.wants_more() or self.await_others()
        finished = []
        try:
            # With configs still to ask, only look for replies: the asks go on in the next turn.
            timeout = 0.0 if self.wants_more() else self.options.heartbeat_s
            idle = sum(not w.busy for w in self.fleet.runners)
            for worker, event in self.fleet.wait(timeout=timeout):
                done = self.on_event(worker, event)
                if done is not None:
                    finished.append(done)
            if finished or sum(not w.busy for w in self.fleet.runners) > idle:
                # The freed runners (of this search's trials, or of an earlier problem's, handed off) get their next
                # configs before the results are written and before the next asks: one process's loop serves every
                # GPU, and the writes (store, Optuna) and asks take longer than the sync dispatch needs.
                self.dispatch()
        finally:
            for candidate, outcome in finished:
                self.finish(candidate, outcome)
        self.heartbeat()
        return True

    def tail(self) -> bool:
        """Whether all that is left of this search is to run configs already compiled, and to wait for those running,
        while a worker (a compile worker the next problem can use, or a runner) is idle: no config is left to ask
        or compile, and no other process has a trial of this study open (a run that shares the study waits for
        those, await_others)."""
        if not (self.running or self.pending) or self.compiling or self.preparing:
            return False
        if any(not c.compiled for c in self.pending):
            return False
        if self.asks < self.max_asks and self.evaluated() + self.live() + self.live_elsewhere < self.budget:
            return False
        if all(w.busy for w in self.fleet.workers):
            return False
        if self.live_elsewhere or time.monotonic() - self.synced_at >= REFILL_SYNC_S:
            self.sync()  # another process's trial that may yet need running here keeps this search going
        return not self.live_elsewhere

    def hand_off(self, then: Callable[[], None]) -> None:
        """The next problem starts now, and this one's last configs run in its background: they go to idle runners
        before the next problem's (Fleet.serve_tails), their results are told as they come (late_reply), and
        ``then`` (the re-timing) follows the last of them. Meanwhile the next problem's first configs compile, and
        the runners move on to it without waiting for them (on an H200 pair, each problem's start had left a runner
        idle for ~0.5 s while its first configs compiled)."""
        self.then = then
        self.progress.late = True
        self.fleet.tails.append(self)
        for worker in self.running:
            self.reply_late(worker)

    def reply_late(self, worker: Worker) -> None:
        """The reply of a run of this handed-off search comes back as a background one, to late_reply."""
        self.fleet.background[worker] = lambda event: self.late_reply(worker, event)

    def dispatch_late(self) -> None:
        """A handed-off search's share of the idle runners (Fleet.serve_tails)."""
        if self.pending:
            self.dispatch_runs(late=True)
            self.finish_late()

    def late_reply(self, worker: Worker, event: Event) -> None:
        """A handed-off trial's result, told as in the search."""
        from optuna.trial import TrialState
        candidate = self.running[worker]
        try:
            finished = self.on_event(worker, event)
            if finished is not None and self.pending:
                self.dispatch_runs(late=True)  # the freed runner's next config first, then the writes
        except ProblemFailed as e:
            # The worker could not run the problem (its setup failed): the trial is left without a verdict for a
            # later run to run, and the winner comes from the rest.
            self.late_failures.append(str(e))
            self.tell(candidate.trial, {"message": f"abandoned: {e}"[:500]}, state=TrialState.FAIL)
            finished = None
        if finished is not None:
            self.finish(*finished)
        self.finish_late()

    def finish_late(self) -> None:
        """Once a handed-off search has nothing left to run: its re-timing."""
        if not self.running and not self.pending and self in self.fleet.tails:
            self.fleet.tails.remove(self)
            self.then()

    def live(self) -> int:
        return len(self.pending) + len(self.running)

    def busy(self) -> bool:
        """Whether a worker is serving this search (the fleet may also serve an earlier problem's re-timing)."""
        return bool(self.running or self.compiling or self.preparing)

    def wants_more(self) -> bool:
        return (self.asks < self.max_asks and self.evaluated() + self.live() + self.live_elsewhere < self.budget
                and self.live() < self.lookahead())

    def lookahead(self) -> int:
        """How many configs may be asked before their results are in. Grid configs and TPE's random start do not
        depend on results: as many as the runners and compile workers can take. After that TPE proposes from the
        results so far, and a wide batch of guesses (constant liar) makes it little better than random at a small
        budget; so TPE_AHEAD per runner: enough to keep each GPU fed from a compile started ahead, no more. (Replayed
        on the H100 grid timings of 5 problems, 40 seeds: within 3% of the grid optimum 85% -> 90%, flash_v1 at 15
        trials 53% -> 70%; bench/search_efficiency.py measures it on a GPU.)"""
        if self.evaluated() + self.live() < self.startup:
            return self.wide
        return min(self.wide, len(self.fleet.runners) * (1 + TPE_AHEAD))

    def await_others(self) -> bool:
        """Nothing is left to do here, but other processes sharing the study may still have trials open: waits for
        them. Their results may change the winner; and the trials of a process that died go stale, are failed, and
        their share of the budget is run again (here, if no one else does). False once none is open elsewhere."""
        self.sync()
        if not self.live_elsewhere:
            return self.wants_more()
        time.sleep(min(POLL_S, self.options.heartbeat_s))
        self.heartbeat()
        return True

    def refill(self) -> None:
        if self.wants_more() and time.monotonic() - self.synced_at >= REFILL_SYNC_S:
            # Other processes may have taken the rest of the budget since the last look. Not on every step: a look
            # reads the whole study, and one process's loop serves all its GPUs. A trial asked over the budget in
            # the meantime stands down in next_ready, which reads the study again before anything runs.
            self.sync()
        for _ in range(ASK_BATCH):
            if not self.wants_more():
                break
            self.ask()

    def ask(self) -> None:
        with trace.span("ask"):
            self._ask()

    def _ask(self) -> None:
        self.top_up()
        with deferred_interrupt():
            trial = self.study.ask()
            self.open[trial.number] = trial
            if self.heartbeats:
                self.storage.record_heartbeat(trial._trial_id)  # from now on, a killed run leaves a stale trial
        trial.set_user_attr("host", HOST)  # which process holds a RUNNING trial, for whoever looks at the study
        self.asks += 1
        if "fixed_params" in self.storage.get_trial_system_attrs(trial._trial_id):  # it came from the queue
            self.queued_ahead = max(0, self.queued_ahead - 1)
        config = suggest_config(trial, self.space)
        key = config_key(config)
        if key in self.seen:
            self.tell_repeat(trial, self.seen[key])
            return
        reason = self.reasons.get(key, "outside SPACE")
        if reason is not None:
            self.tell_pruned(trial, config, key, reason)
            return
        self.pending.append(Candidate(trial, config, key, compiled=not self.fleet.compilers))

    def dispatch(self) -> None:
        self.fleet.serve_tails()  # an earlier problem's last configs first
        for worker in [w for w in self.fleet.compilers if not w.busy]:
            todo = [c for c in self.pending if not c.compiled and c not in self.compiling.values()]
            if not todo:
                break
            worker.submit(Compile(self.module_path, self.problem, self.options.seed, todo[0].config),
                          self.options.timeout)
            self.compiling[worker] = todo[0]
        self.dispatch_runs()

    def dispatch_runs(self, late: bool = False) -> None:
        """Gives each idle runner the next compiled config; ``late``: this search was handed off, and the replies
        come back as background ones (late_reply)."""
        if self.pending and not all(w.busy for w in self.fleet.runners):
            # Other processes' trials, read after the pending ones' parameters were written (see next_ready).
            self.sync()
        for worker in [w for w in self.fleet.runners if not w.busy]:
            candidate = self.next_ready()
            if candidate is None:
                if self.pending and not late:
                    self.prepare(worker)
                continue
            self.pending.remove(candidate)
            candidate.started_at = _now()
            gpu = "" if worker.visible_device is None else f":gpu{worker.visible_device}"
            candidate.runner = f"{worker.name}{gpu}"
            worker.submit(Run(self.module_path, self.problem, self.options.seed, candidate.config),
                          self.options.timeout)
            self.running[worker] = candidate
            if late:
                self.reply_late(worker)

    def prepare(self, worker: Worker) -> None:
        """An idle runner builds the problem's inputs and references (while the first configs are asked and
        compiled), once."""
        if worker.loaded != (self.problem, self.options.seed):
            worker.submit(Setup(self.problem, self.options.seed), self.options.setup_timeout)
            self.preparing.add(worker)

    def next_ready(self) -> Candidate | None:
        """The first pending config that is compiled and not already running; repeats of finished ones are told.

        Across processes, of the trials for one config the lowest-numbered runs and the others stand down. Optuna
        numbers trials one at a time per study, so every lower-numbered trial exists when a trial is dispatched;
        one whose config is not all written yet holds higher ones back until it is. So no config runs twice, and
        no two trials stand down for each other. Likewise a trial stands down if the trials numbered below it that
        have or may yet have a verdict already fill the budget: a budget shared by processes is never overrun."""
        running = {c.key for c in self.running.values()} | self.finishing
        for candidate in list(self.pending):
            if candidate.key in self.seen:
                self.pending.remove(candidate)
                self.tell_repeat(candidate.trial, self.seen[candidate.key])
            elif self.elsewhere.get(candidate.key, candidate.trial.number) < candidate.trial.number:
                self.pending.remove(candidate)
                self.tell_running_elsewhere(candidate.trial, self.elsewhere[candidate.key])
            elif bisect.bisect_left(self.claims, candidate.trial.number) >= self.budget:
                self.pending.remove(candidate)
                self.tell_over_budget(candidate.trial)
            elif (candidate.compiled and candidate.key not in running
                  and not any(n < candidate.trial.number for n in self.choosing)):
                return candidate
        return None

    def on_event(self, worker: Worker, event: Event) -> tuple[Candidate, Outcome] | None:
        """Frees the worker; for a run, returns its candidate and outcome, for the caller to finish (tell)."""
        if worker in self.compiling:
            self.compiling.pop(worker).compiled = True  # or failed: the runner compiles it and reports the error
            return None
        if worker in self.preparing:
            self.preparing.discard(worker)
            if event.kind != "ok":
                raise ProblemFailed(event.message or f"setting up the problem: the worker {event.kind}")
            return None
        candidate = self.running[worker]
        if event.kind == "ok":
            outcome = event.value
        elif event.kind == "died":
            outcome = Outcome("crashed", event.message)
        elif event.kind == "timeout":
            outcome = Outcome("timeout", event.message)
        else:
            del self.running[worker]  # abandoned with the other open trials: not this config's fault
            raise ProblemFailed(event.message)
        del self.running[worker]
        self.finishing.add(candidate.key)  # not run again while its result is being written
        return candidate, outcome

    def heartbeat(self) -> None:
        import optuna
        if not self.heartbeats or time.monotonic() - self.last_beat < self.options.heartbeat_s:
            return
        self.last_beat = time.monotonic()
        for search in (self, *self.fleet.tails):  # and the trials of earlier problems still finishing
            for trial in search.open.values():
                self.storage.record_heartbeat(trial._trial_id)
        optuna.storages.fail_stale_trials(self.study)  # the trials of another process that died

    # -- telling Optuna and the store

    def finish(self, candidate: Candidate, outcome: Outcome) -> None:
        """Writes a run's result (store, then Optuna): it is no longer one being written (``finishing``)."""
        self.finishing.discard(candidate.key)
        with trace.span("finish"):
            self._finish(candidate, outcome)

    def _finish(self, candidate: Candidate, outcome: Outcome) -> None:
        from optuna.trial import TrialState
        from .store import TrialResult
        trial, ok = candidate.trial, outcome.status == "ok"
        # Optuna commits each attribute on its own; the timings' spread and throughput go to the store alone.
        attrs = {"status": outcome.status, "runner": candidate.runner,
                 **({"message": outcome.message[:500]} if outcome.message else {})}
        # The store first: a run stopped between the two writes re-runs the trial rather than lose its record.
        self.store.record_trial(self.device, self.kernel, self.hash, self.problem, TrialResult(
            trial.number, candidate.config, outcome.status, outcome.median_ms, outcome.p20_ms, outcome.p80_ms,
            outcome.throughput, outcome.err_ratio, outcome.message, candidate.started_at, _now()))
        self.tell(trial, attrs, outcome.median_ms if ok else None, state=None if ok else TrialState.FAIL)
        self.seen[candidate.key] = Seen(candidate.config, outcome.status, trial.number, outcome.median_ms)
        self.progress.trial(trial.number, candidate.config, outcome, self.evaluated(), self.counts(), self.best_ms())

    def tell_pruned(self, trial, config: dict, key: tuple, reason: str) -> None:
        from optuna.trial import TrialState
        from .store import TrialResult
        now = _now()
        self.store.record_trial(self.device, self.kernel, self.hash, self.problem,
                                TrialResult(trial.number, config, "pruned", message=reason, started_at=now,
                                            finished_at=now))
        self.tell(trial, {"status": "pruned", "message": reason[:500]}, state=TrialState.PRUNED)
        self.seen[key] = Seen(config, "pruned", trial.number, None)

    def tell_repeat(self, trial, seen: Seen) -> None:
        """A config already evaluated: Optuna is told the earlier result (so TPE learns), nothing runs again."""
        from optuna.trial import TrialState
        # duplicate_of first: Optuna commits each attribute on its own, and a run that dies between the two must not
        # leave a trial that reads as an evaluation (a status without duplicate_of).
        attrs = {"duplicate_of": seen.number, "status": seen.status}
        if seen.status == "ok":
            self.tell(trial, attrs, seen.median_ms)
        else:
            self.tell(trial, attrs, state=TrialState.PRUNED if seen.status == "pruned" else TrialState.FAIL)

    def tell_running_elsewhere(self, trial, number: int) -> None:
        """Another process is running this config: this trial is failed as its duplicate (no status, so it counts
        for nothing), and the other's result arrives with a later sync."""
        from optuna.trial import TrialState
        self.tell(trial, {"duplicate_of": number, "message": f"the config is running elsewhere (trial {number})"},
                  state=TrialState.FAIL)

    def tell_over_budget(self, trial) -> None:
        from optuna.trial import TrialState
        self.tell(trial, {"message": "not run: earlier trials (here or in other processes) took the budget"},
                  state=TrialState.FAIL)

    def abandon(self, replace_busy: bool) -> None:
        """Trials this run asked but did not finish go to FAIL without a status, so that a later run may run them."""
        from optuna.trial import TrialState
        if replace_busy:
            for worker in list(self.running) + list(self.compiling) + list(self.preparing):
                worker.cancel()
        for trial in list(self.open.values()):
            try:
                self.tell(trial, {"message": "abandoned: the run stopped before this trial finished"},
                          state=TrialState.FAIL)
            except Exception as e:  # the storage itself may be what failed; the heartbeat will fail the trial
                print(f"tunebench tune: could not mark trial {trial.number} failed: {e}", file=sys.stderr)
        self.pending, self.running, self.compiling, self.preparing = [], {}, {}, set()

    def tell(self, trial, attrs: dict, value: float | None = None, state=None) -> None:
        """Sets the trial's user attributes and finishes it. A trial that another process has already failed (its
        heartbeat went stale) keeps that state; the result still goes to the store."""
        import optuna
        try:
            for name, attr in attrs.items():
                trial.set_user_attr(name, attr)
            self.study.tell(trial, value, state=state, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        self.open.pop(trial.number, None)

    # -- the winner

    def best_ms(self) -> float | None:
        times = [s.median_ms for s in self.seen.values() if s.status == "ok"]
        return min(times) if times else None

    def confirm(self, done: Callable[[ProblemResult], None], share: bool = True) -> None:
        """Re-times the best few ok configs and DEFAULT against each other in interleaved rounds, in the background
        of the next problem's search; then upserts the fastest as the winner. Each round times every finalist on one
        GPU. ``share``: the rounds are shared out among the runners idle now (all of one kind of GPU:
        Fleet.identify), for the last problem's re-timing, which nothing else overlaps. Otherwise one runner takes
        them all while the others start the next search: a runner sharing them loads and warms up every finalist
        itself (on an H200 pair a flash problem's re-timing took 20-60% more runner time shared than on one GPU)."""
        oks = sorted((s for s in self.seen.values() if s.status == "ok"), key=lambda s: s.median_ms)
        if not oks:
            done(ProblemResult(self.problem, counts=self.counts(), note="no config passed"))
            return
        finalists = oks[:self.options.top_k]
        default = self.seen.get(config_key(self.module.DEFAULT))
        if default is not None and default.status == "ok" and default not in finalists:
            finalists.append(default)
        rounds = RETIME_ROUNDS_INTERPRET if self.options.interpret else RETIME_ROUNDS
        extra = EXTRA_ROUNDS_INTERPRET if self.options.interpret else EXTRA_ROUNDS
        workers = self.fleet.idle_runners(loaded=(self.problem, self.options.seed))[:rounds if share else 1]
        shares = [rounds // len(workers) + (i < rounds % len(workers)) for i in range(len(workers))]
        parts: list[Event] = []

        def on_part(event: Event) -> None:
            parts.append(event)
            if len(parts) < len(shares):
                return
            failed = [e for e in parts if e.kind != "ok"]
            # Each part: per finalist, its medians of that part's rounds.
            merged = failed[0] if failed else Event("ok", [sum((e.value[i] for e in parts), [])
                                                           for i in range(len(finalists))])
            trace.event("retimed", index=self.progress.index, runners=[w.name for w in workers],
                        configs=[format_config(s.config) for s in finalists], rounds_ms=merged.value)
            close = timing.contenders(merged.value) if merged.kind == "ok" and extra else []
            if len(close) < 2:
                done(self.confirmed(finalists, default, merged))
                return

            def on_extra(event: Event) -> None:
                # The contenders' extra rounds join their first ones; a failed extra re-timing leaves those.
                if event.kind == "ok":
                    for i, more in zip(close, event.value):
                        merged.value[i] += more
                trace.event("retimed", index=self.progress.index, extra=True, configs=[format_config(
                    finalists[i].config) for i in close], rounds_ms=[merged.value[i] for i in close])
                done(self.confirmed(finalists, default, merged))

            [worker] = self.fleet.idle_runners(loaded=(self.problem, self.options.seed))[:1]
            request = Retime(self.module_path, self.problem, self.options.seed,
                             [finalists[i].config for i in close], extra, first=rounds)
            self.fleet.submit_background(worker, request, self.options.timeout * extra, on_extra)

        for i, (worker, n_rounds) in enumerate(zip(workers, shares)):
            request = Retime(self.module_path, self.problem, self.options.seed, [s.config for s in finalists],
                             n_rounds, first=sum(shares[:i]))
            self.fleet.submit_background(worker, request, self.options.timeout * n_rounds, on_part)

    def confirmed(self, finalists: list[Seen], default: Seen | None, event: Event) -> ProblemResult:
        """The winner by the re-timing's medians (by the trial medians if it failed), upserted into the store."""
        default_ok = default is not None and default.status == "ok"
        counts = self.counts()
        if event.kind == "ok":
            ms, note = [timing.confirmed_ms(r) for r in event.value], ""
        else:
            ms = [s.median_ms for s in finalists]
            note = f"re-timing failed ({event.kind}: {event.message}); trial medians used"
        best = min(range(len(finalists)), key=ms.__getitem__)
        default_ms = ms[finalists.index(default)] if default_ok else None
        speedup = default_ms / ms[best] if default_ms else None
        if not default_ok:
            note = _join(note, f"DEFAULT is {default.status if default else 'not evaluated'}")
        if self.late_failures:
            note = _join(note, f"{len(self.late_failures)} trial(s) not run: {self.late_failures[0]}")
        config = finalists[best].config
        written = self.store.upsert_winner(self.device, self.kernel, self.hash, self.problem, config, ms[best],
                                           speedup)
        if not written:
            note = _join(note, "the store keeps a faster earlier winner")
        return ProblemResult(self.problem, config, ms[best], default_ms, speedup, counts, written=written, note=note)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C waits for the end of the block. Optuna's ask() creates the trial before it samples the parameters; an
    interrupt in between would leave a RUNNING trial that no one knows about, fails or retries."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def owner_is_dead(host: str | None) -> bool:
    """Whether the process named by a trial's "host" attribute ("hostname:pid", see HOST) ran on this host and has
    exited. False when that cannot be known here (another host, no attribute): the heartbeat then decides. A reused
    pid reads as alive, which only leaves the trial to the heartbeat too."""
    name, _, pid = (host or "").rpartition(":")
    if name != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: alive
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is as dead as a gone process
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- progress and summary


class Progress:
    """A line per problem on stderr: redrawn in place on a terminal, one line per finished trial in a log."""

    def __init__(self, stream, index: int, total: int, problem: Problem):
        self.stream, self.index, self.total, self.problem = stream, index, total, problem
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.budget = 0
        self.start = time.monotonic()
        self.late = False   # the next problem has started (Search.hand_off): trials say which problem they are of

    def begin(self, budget: int, evaluated: int, counts: dict) -> None:
        self.budget, self.start = budget, time.monotonic()
        resumed = f", {evaluated} done before" if evaluated else ""
        self._print(f"[{self.index + 1}/{self.total}] {self.problem.label()}: {budget} trials{resumed}")

    def trial(self, number: int, config: dict, outcome: Outcome, evaluated: int, counts: dict,
              best_ms: float | None) -> None:
        if self.tty:
            if not self.late:  # the line being redrawn is the next problem's now
                self._redraw(evaluated, counts, best_ms)
            return
        ms = f" {outcome.median_ms:.4f} ms" if outcome.median_ms is not None else ""
        why = f" ({outcome.message[:120]})" if outcome.message and outcome.status != "ok" else ""
        of = f" of [{self.index + 1}/{self.total}]" if self.late else ""
        self._print(f"  #{number}{of} {outcome.status}{ms} {format_config(config)}{why}")

    def end(self, result: ProblemResult) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        done = (f"{format_config(result.config)} {result.median_ms:.4f} ms"
                if result.config is not None else "no winner")
        note = f" ({result.note})" if result.note else ""
        self._print(f"[{self.index + 1}/{self.total}] {self.problem.label()}: {done}{note} "
                    f"[{time.monotonic() - self.start:.0f} s]")

    def _redraw(self, evaluated: int, counts: dict, best_ms: float | None) -> None:
        width = 20
        filled = width * min(evaluated, self.budget) // max(self.budget, 1)
        best = f" best {best_ms:.4f} ms" if best_ms is not None else ""
        line = (f"[{self.index + 1}/{self.total}] {self.problem.label()} [{'#' * filled}{'.' * (width - filled)}] "
                f"{evaluated}/{self.budget} {format_counts(counts)}{best} {time.monotonic() - self.start:.0f}s")
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def format_config(config: dict | None) -> str:
    return "-" if config is None else " ".join(f"{k}={v}" for k, v in config.items())


def format_counts(counts: dict) -> str:
    from .store import STATUSES
    return " ".join(f"{s} {counts[s]}" for s in STATUSES if counts.get(s))


def summary(results: list[ProblemResult], wall_s: float, interpret: bool) -> str:
    header = ["problem", "winner config", "ms", "vs DEFAULT", "trials (distinct configs)", "wall s"]
    rows = [[r.problem.label(), format_config(r.config),
             "-" if r.median_ms is None else f"{r.median_ms:.4f}",
             "-" if r.speedup is None else f"{r.speedup:.2f}x",
             format_counts(r.counts) or "-", f"{r.wall_s:.0f}"] for r in results]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.problem.label()}: {r.note}" for r in results if r.note]
    speedups = [r.speedup for r in results if r.speedup is not None]
    tail = [f"{len(results)} problems in {wall_s:.0f} s"]
    if speedups:
        tail.append(f"speedup over DEFAULT: median {statistics.median(speedups):.2f}x, "
                    f"range {min(speedups):.2f}x-{max(speedups):.2f}x")
    if interpret:
        tail.append("cpu-interpreter: times are wall clock under the Triton interpreter, not a speed measurement")
    return "\n".join(lines + (["notes:"] + notes if notes else []) + tail)

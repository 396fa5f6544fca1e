"""A simulated fleet: worker processes that serve the tuner's protocol (tunebench.tune.protocol) by sleeping, for
measuring how many GPUs one parent loop keeps busy, on a CPU.

Only what runs on a GPU is simulated: a Run sleeps for a trial's duration (drawn from ``durations_s``: recorded
trial durations, or one fixed value) and reports an ok Outcome whose time is a fixed function of the config; a
Retime sleeps one duration per finalist per round. Everything else is real: the parent's loop (Search, Fleet,
confirm), Optuna's storage and the results store. Pass a Simulation as the Fleet's ``serve`` and the Fleet to
tune(..., fleet=...), with options.interpret set (the parent then needs no GPU).

The worker imports neither torch nor triton: a simulated worker starts in a fraction of a second, so start-up does
not hide the loop's own cost. Each simulated request writes a "simulated" span to $TUNEBENCH_TRACE (worker,
request, problem, config), which ``utilisation`` reads.

Several hosts (``simulate_hosts``): parent processes started together, each with its own simulated fleet, on one
Optuna storage and results store (a PostgreSQL server: ``scratch_database`` gives each measurement an empty one), so
that they share each problem's study and its budget, as `tunebench tune` processes on many hosts do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import random
import signal
import time
import uuid
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

from ..device import DeviceIdentity
from .protocol import Compile, Identify, Outcome, Retime, Run, Setup
from .serving import reply, serve_requests
from . import trace

DEVICE_NAME = "simulated"


@dataclass(frozen=True)
class Simulation:
    """A simulated worker's entry point (Fleet's ``serve``): picklable, so spawn hands it to the process."""
    durations_s: tuple[float, ...] = (0.02,)   # a trial's duration is drawn from these
    seed: int = 0
    setup_s: float = 0.0                        # building a problem's inputs and references
    imports_torch = False                       # so it is spawned: a forkserver would import torch for nothing

    def __post_init__(self):
        if not self.durations_s or any(not d >= 0 for d in self.durations_s):
            raise ValueError(f"durations_s must be durations >= 0 s, got {self.durations_s!r}")

    def __call__(self, conn, role: str, interpret: bool, visible_device: str | None, threads: int,
                 name: str = "") -> None:
        serve(self, conn, name or role)


def simulated_ms(config: dict) -> float:
    """A config's simulated kernel time: fixed per config, so that a search has one winner whatever the fleet."""
    return 1.0 + zlib.crc32(json.dumps(config, sort_keys=True).encode()) % 1000 / 100


def serve(sim: Simulation, conn, name: str) -> None:
    trace.in_worker()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a real worker: Ctrl-C is the parent's
    rng = random.Random(f"{sim.seed}:{name}")

    def answer(request) -> tuple[tuple, bool]:
        try:
            return ("ok", handle(sim, rng, request, name)), False
        except Exception as e:  # as a real worker: the request failed, the process goes on
            return ("error", f"{type(e).__name__}: {e}"), False

    if reply(conn, ("ready", os.getpid())):
        serve_requests(conn, answer)


def handle(sim: Simulation, rng: random.Random, request, name: str):
    if isinstance(request, Identify):
        return dataclasses.replace(DeviceIdentity.current(interpret=True), name=DEVICE_NAME)
    if isinstance(request, Setup):
        time.sleep(sim.setup_s)
        return None
    if isinstance(request, Compile):
        return ""
    label = request.problem.label()
    if isinstance(request, Run):
        with trace.span("simulated", worker=name, request="Run", problem=label, config=request.config):
            time.sleep(rng.choice(sim.durations_s))
        ms = simulated_ms(request.config)
        return Outcome("ok", median_ms=ms, p20_ms=ms, p80_ms=ms, err_ratio=0.0)
    if isinstance(request, Retime):
        with trace.span("simulated", worker=name, request="Retime", problem=label):
            time.sleep(sum(rng.choice(sim.durations_s) for _ in range(len(request.configs) * request.rounds)))
        return [[simulated_ms(c)] * request.rounds for c in request.configs]
    raise ValueError(f"unknown request {request!r}")


@dataclass
class Utilisation:
    """How busy a simulated fleet was while the parent searched: from the first simulated trial's start to the last
    one's end (start-up and the last re-timing are left out), each runner's share of that window spent in
    simulated GPU work (trials and re-timings)."""
    window_s: float
    busy: dict[str, float]          # runner -> busy fraction of the window
    runs: list[tuple[str, str]]     # (problem, config as JSON) of every simulated trial, in order
    asks: int                       # the parent's Optuna asks in the window
    ask_s: float                    # the parent's time in them

    @property
    def mean_busy(self) -> float:
        return sum(self.busy.values()) / len(self.busy) if self.busy else 0.0

    @property
    def duplicates(self) -> int:
        """Trials run more than once (same problem and config)."""
        return len(self.runs) - len(set(self.runs))


def utilisation(events: list[dict], runners: list[str]) -> Utilisation:
    """The utilisation of ``runners`` from a run's trace events (one dict per $TUNEBENCH_TRACE line)."""
    spans = [(e["t"] - e["s"], e["t"], e) for e in events if e["kind"] == "simulated"]
    trials = [(a, b) for a, b, e in spans if e["request"] == "Run"]
    if not trials:
        raise ValueError("the trace holds no simulated trial: was the fleet simulated, and $TUNEBENCH_TRACE set?")
    lo, hi = min(a for a, _ in trials), max(b for _, b in trials)
    window = hi - lo
    busy = {w: sum(max(0.0, min(b, hi) - max(a, lo)) for a, b, e in spans if e["worker"] == w) / window
            for w in runners}
    runs = [(e["problem"], json.dumps(e["config"], sort_keys=True)) for _, _, e in spans if e["request"] == "Run"]
    asks = [e for e in events if e["kind"] == "ask" and lo <= e["t"] <= hi]
    return Utilisation(window, busy, runs, len(asks), sum(e["s"] for e in asks))


def read_trace(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def simulate(problems: list, options, sim: Simulation, trace_path, err=None,
             ready: Callable[[], None] | None = None) -> tuple[list, Utilisation]:
    """Tunes ``problems`` with the real parent loop on a fleet of ``options.workers`` simulated runners (and
    ``options.compile_workers`` simulated compile workers), tracing to ``trace_path``; returns tune()'s results and
    the runners' utilisation. ``ready``: called once the fleet is up, before tuning (hosts wait for each other)."""
    from .pool import Fleet
    from .run import tune
    if not options.interpret:
        raise ValueError("a simulated fleet runs with options.interpret set: the parent must not look for a GPU")
    with trace.writing_to(trace_path):
        fleet = Fleet(options, serve=sim)
        with fleet:
            if ready is not None:
                ready()
            results = tune(problems, options, fleet=fleet, err=err)
    return results, utilisation(read_trace(trace_path), [w.name for w in fleet.runners])


# -- several hosts: parent processes sharing one storage


@dataclass
class HostRun:
    """What one simulated host (a parent process and its fleet) did."""
    results: list                   # its tune() results, one per problem
    use: Utilisation                # its runners' utilisation (its own trace)
    wall_s: float                   # from the start line (every host's fleet up) to its last result
    cpu_s: float                    # the parent process's CPU time in that span (its workers' not counted)


def simulate_hosts(hosts: int, problems: list, options, sim: Simulation, folder) -> tuple[list[HostRun], Utilisation]:
    """Runs ``hosts`` parent processes at once, each simulate()-ing ``problems`` with its own fleet of
    ``options.workers`` runners, on ``options.storage`` and ``options.db`` (one server for all: they share each
    problem's study and budget). They start tuning together, once every fleet is up. Returns each host's run and the
    whole fleet's utilisation from all their traces (``folder``/hostI.jsonl), its runners named hostI/runJ: its
    ``runs`` are every host's, so its ``duplicates`` are configs run twice across hosts."""
    if hosts > 1:
        if options.storage is None:
            raise ValueError("simulated hosts share their studies through one options.storage URL")
        from ..store import Store
        from .study import close_storage, open_storage, quiet_optuna
        # The tables: made here once, not raced for by the hosts at the start line.
        with Store(options.db) as store, warnings.catch_warnings():
            quiet_optuna()
            close_storage(open_storage(options.storage, store.url))
    paths = [folder / f"host{i}.jsonl" for i in range(hosts)]
    spawn = multiprocessing.get_context("spawn")    # as a host's own process: nothing inherited from this one
    with ProcessPoolExecutor(hosts, mp_context=spawn, initializer=_join_start_line,
                             initargs=(spawn.Barrier(hosts),)) as pool:
        runs = list(pool.map(run_host, [problems] * hosts, [options] * hosts, [sim] * hosts, paths))
    events = [dict(e, worker=f"host{i}/{e['worker']}") if "worker" in e else e
              for i, path in enumerate(paths) for e in read_trace(path)]
    return runs, utilisation(events, [f"host{i}/{name}" for i, run in enumerate(runs) for name in run.use.busy])


START_LINE_TIMEOUT_S = 300.0   # how long a host's fleet waits for the others' to be up
_start_line = None  # a host process's barrier (set by _join_start_line: a Barrier passes only at process start)


def _join_start_line(barrier) -> None:
    global _start_line
    _start_line = barrier


def run_host(problems: list, options, sim: Simulation, trace_path) -> HostRun:
    """One host, in a process of simulate_hosts' pool: waits at the start line once its fleet is up and its kernels
    are imported (as tune() would import them: seconds of triton that would otherwise stagger the hosts' starts). A
    host that fails breaks the line, so that the others do not wait for it."""
    from ..registry import kernel_module
    from .startup import interpreting
    started = []

    def start_line() -> None:
        _start_line.wait(START_LINE_TIMEOUT_S)
        started.extend((time.perf_counter(), time.process_time()))

    try:
        with interpreting(options.interpret):
            for kernel in {p.kernel for p in problems}:
                kernel_module(kernel)
        results, use = simulate(problems, options, sim, trace_path, err=io.StringIO(), ready=start_line)
    except BaseException:
        _start_line.abort()
        raise
    return HostRun(results, use, time.perf_counter() - started[0], time.process_time() - started[1])


@contextlib.contextmanager
def scratch_database(server_url: str):
    """A new, empty database on the PostgreSQL server of ``server_url`` (its user needs CREATEDB), dropped after the
    block; yields its URL. Each measured run (or test) then starts with no study and no stored trial, rather than
    finding the last one's studies finished."""
    import sqlalchemy
    from sqlalchemy.engine import make_url
    name = f"tunebench_scratch_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()

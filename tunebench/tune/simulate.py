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
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import time
import zlib
from dataclasses import dataclass

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


def simulate(problems: list, options, sim: Simulation, trace_path, err=None) -> tuple[list, Utilisation]:
    """Tunes ``problems`` with the real parent loop on a fleet of ``options.workers`` simulated runners (and
    ``options.compile_workers`` simulated compile workers), tracing to ``trace_path``; returns tune()'s results and
    the runners' utilisation."""
    from .pool import Fleet
    from .run import tune
    if not options.interpret:
        raise ValueError("a simulated fleet runs with options.interpret set: the parent must not look for a GPU")
    with trace.writing_to(trace_path):
        fleet = Fleet(options, serve=sim)
        with fleet:
            results = tune(problems, options, fleet=fleet, err=err)
    return results, utilisation(read_trace(trace_path), [w.name for w in fleet.runners])

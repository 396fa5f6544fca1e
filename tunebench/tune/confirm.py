"""The winner of a problem: its best few ok configs and DEFAULT re-timed against each other, so that noise does not
pick it, then upserted into the store (a faster time replaces a slower one, never the reverse). The store's winner
is then written to the problem's Optuna study (its `winner` user attribute), so optuna-dashboard agrees with it.

The re-timing runs in the background of the next problem's search: the fleet hands its replies to the callbacks here
(Fleet.submit_background), and the result goes to ``done`` once the last of them is in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..shapes import Problem, bucket_key
from ..text import format_config
from .protocol import Event, Retime
from .shared import Seen, SharedStudy
from ..registry import config_key
from .study import record_winner
from . import timing, trace

if TYPE_CHECKING:
    from .options import TuneOptions
    from .pool import Fleet

RETIME_ROUNDS = 3
RETIME_ROUNDS_INTERPRET = 2
EXTRA_ROUNDS = 2                # more rounds for the finalists whose rounds overlap the leader's (timing.contenders)
EXTRA_ROUNDS_INTERPRET = 0      # wall-clock rounds on a CPU: none (they would say nothing about a GPU's ranking)


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


@dataclass
class Confirmation:
    """What re-timing one problem's finalists needs to know of its search."""
    fleet: "Fleet"
    options: "TuneOptions"
    shared: SharedStudy
    module_path: str
    default: dict                   # the kernel's DEFAULT config
    index: int                      # the problem's place in the run, for the trace
    late_failures: list[str]        # handed-off trials that could not run (Search.late_reply)


def confirm(job: Confirmation, done: Callable[[ProblemResult], None], share: bool = True) -> None:
    """Re-times the best few ok configs and DEFAULT against each other in interleaved rounds, in the background
    of the next problem's search; then upserts the fastest as the winner. Each round times every finalist on one
    GPU. ``share``: the rounds are shared out among the runners idle now (all of one kind of GPU:
    Fleet.identify), for the last problem's re-timing, which nothing else overlaps. Otherwise one runner takes
    them all while the others start the next search: a runner sharing them loads and warms up every finalist
    itself, which costs more runner time than one runner taking every round."""
    shared, options, problem = job.shared, job.options, job.shared.problem
    oks = sorted((s for s in shared.seen.values() if s.status == "ok"), key=lambda s: s.median_ms)
    if not oks:
        done(ProblemResult(problem, counts=shared.counts(), note="no config passed"))
        return
    finalists = oks[:options.top_k]
    default = shared.seen.get(config_key(job.default))
    if default is not None and default.status == "ok" and default not in finalists:
        finalists.append(default)
    rounds = RETIME_ROUNDS_INTERPRET if options.interpret else RETIME_ROUNDS
    extra = EXTRA_ROUNDS_INTERPRET if options.interpret else EXTRA_ROUNDS
    loaded = (problem, options.seed)
    workers = job.fleet.idle_runners(loaded=loaded)[:rounds if share else 1]
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
        trace.event("retimed", index=job.index, runners=[w.name for w in workers],
                    configs=[format_config(s.config) for s in finalists], rounds_ms=merged.value)
        close = timing.contenders(merged.value) if merged.kind == "ok" and extra else []
        if len(close) < 2:
            done(winner(job, finalists, default, merged))
            return

        def on_extra(event: Event) -> None:
            # The contenders' extra rounds join their first ones; a failed extra re-timing leaves those.
            if event.kind == "ok":
                for i, more in zip(close, event.value):
                    merged.value[i] += more
            trace.event("retimed", index=job.index, extra=True, configs=[format_config(
                finalists[i].config) for i in close], rounds_ms=[merged.value[i] for i in close])
            done(winner(job, finalists, default, merged))

        [worker] = job.fleet.idle_runners(loaded=loaded)[:1]
        request = Retime(job.module_path, problem, options.seed, [finalists[i].config for i in close], extra,
                         first=rounds)
        job.fleet.submit_background(worker, request, options.timeout * extra, on_extra)

    for i, (worker, n_rounds) in enumerate(zip(workers, shares)):
        request = Retime(job.module_path, problem, options.seed, [s.config for s in finalists], n_rounds,
                         first=sum(shares[:i]))
        job.fleet.submit_background(worker, request, options.timeout * n_rounds, on_part)


def winner(job: Confirmation, finalists: list[Seen], default: Seen | None, event: Event) -> ProblemResult:
    """The winner by the re-timing's medians (by the trial medians if it failed), upserted into the store."""
    default_ok = default is not None and default.status == "ok"
    counts = job.shared.counts()
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
    if job.late_failures:
        note = _join(note, f"{len(job.late_failures)} trial(s) not run: {job.late_failures[0]}")
    config = finalists[best].config
    written = job.shared.upsert_winner(config, ms[best], speedup)
    if not written:
        note = _join(note, "the store keeps a faster earlier winner")
    stored = stored_winner(job.shared)
    if stored is not None:
        if written:
            stored["trial"] = finalists[best].number
        record_winner(job.shared.study, stored)
    return ProblemResult(job.shared.problem, config, ms[best], default_ms, speedup, counts, written=written,
                         note=note)


def stored_winner(shared: SharedStudy) -> dict | None:
    """The winner the store holds for the study's device, kernel identity and bucket (what the dispatcher runs), as
    JSON for the study's `winner` attribute; None if the store has none."""
    key = bucket_key(shared.problem)
    for w in shared.store.winners(device_name=shared.device.name, kernel=shared.kernel):
        if w.source_hash == shared.hash and bucket_key(w.problem) == key:
            return {"config": w.config, "median_ms": w.median_ms, "speedup_vs_default": w.speedup_vs_default,
                    "updated_at": w.updated_at.isoformat()}
    return None


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)

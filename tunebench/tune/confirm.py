"""The winner of a problem: its best few ok configs and DEFAULT re-timed against each other, so that noise does not
pick it, then upserted into the store (a faster time replaces a slower one, never the reverse, unless the run was
asked to replace: tune --replace). The store's winner is then written to the problem's Optuna study (its `winner`
user attribute), so optuna-dashboard agrees with it.

A kernel that replaces another where it runs (registry.REPLACES: flash_v3 for flash_v2) has the other's config for the
bucket (its stored winner, else its DEFAULT) timed in the same rounds on the same inputs: the winner's speedup over it
(speedup_vs_peer) is what variant="auto" goes by, since two winners' times from different runs are not comparable
(on an H100 one config's time at ~0.1 ms varied up to 3x between runs).

The re-timing runs in the background of the next problem's search: the fleet hands its replies to the callbacks here
(Fleet.submit_background), and the result goes to ``done`` once the last of them is in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..shapes import Problem, bucket_key
from ..text import format_config
from .protocol import Event, Retime
from .shared import Seen, SharedStudy
from ..registry import REPLACES, config_key, kernel_identity, kernel_module, module_path
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
    speedup_vs_peer: float | None = None        # over the replaced kernel's config, in the same re-timing


@dataclass(frozen=True)
class Peer:
    """The replaced kernel's config for the problem's bucket, re-timed beside the finalists."""
    kernel: str
    module_path: str
    config: dict
    label: str                      # "its winner" or "DEFAULT"


def peer_of(shared: SharedStudy) -> Peer | None:
    """For a kernel that replaces another (flash_v3), the other's current winner for the same bucket on this device,
    if its keep() still admits it, else its DEFAULT; None for any other kernel."""
    problem = shared.problem
    kernel = REPLACES.get(problem.kernel)
    if kernel is None:
        return None
    module, twin = kernel_module(kernel), dataclasses.replace(problem, kernel=kernel)
    for w in _current_winners(shared.store, shared.device.name, kernel, kernel_identity(kernel), twin):
        if module.keep(w.config, twin) is None:
            return Peer(kernel, module_path(kernel), w.config, "its winner")
    return Peer(kernel, module_path(kernel), dict(module.DEFAULT), "DEFAULT")


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
    peer = peer_of(shared)
    if peer is not None:
        # The stored winner runs in the re-timing too (a new run's finalists may not hold it: a fresh study), so that
        # its speedup over the peer, which variant="auto" goes by, is measured anew even if it keeps its place.
        stored = stored_winner(shared)
        if stored is not None and config_key(stored["config"]) not in {config_key(s.config) for s in finalists}:
            finalists.append(Seen(stored["config"], "ok", None, stored["median_ms"]))
    n = len(finalists)
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
        # Each part: per finalist (then the peer), its medians of that part's rounds.
        merged = failed[0] if failed else Event("ok", [sum((e.value[i] for e in parts), [])
                                                       for i in range(n + (peer is not None))])
        trace.event("retimed", index=job.index, runners=[w.name for w in workers],
                    configs=[format_config(s.config) for s in finalists], rounds_ms=merged.value)
        close = timing.contenders(merged.value[:n]) if merged.kind == "ok" and extra else []
        if len(close) < 2:
            done(winner(job, finalists, default, merged, peer))
            return

        def on_extra(event: Event) -> None:
            # The contenders' extra rounds join their first ones; a failed extra re-timing leaves those.
            if event.kind == "ok":
                for i, more in zip(close, event.value):
                    merged.value[i] += more
            trace.event("retimed", index=job.index, extra=True, configs=[format_config(
                finalists[i].config) for i in close], rounds_ms=[merged.value[i] for i in close])
            done(winner(job, finalists, default, merged, peer))

        [worker] = job.fleet.idle_runners(loaded=loaded)[:1]
        request = Retime(job.module_path, problem, options.seed, [finalists[i].config for i in close], extra,
                         first=rounds)
        job.fleet.submit_background(worker, request, options.timeout * extra, on_extra)

    for i, (worker, n_rounds) in enumerate(zip(workers, shares)):
        request = Retime(job.module_path, problem, options.seed, [s.config for s in finalists], n_rounds,
                         first=sum(shares[:i]), peer=(peer.module_path, peer.config) if peer else ())
        job.fleet.submit_background(worker, request, options.timeout * n_rounds, on_part)


def winner(job: Confirmation, finalists: list[Seen], default: Seen | None, event: Event,
           peer: Peer | None = None) -> ProblemResult:
    """The winner by the re-timing's medians (by the trial medians if it failed), upserted into the store with its
    speedup over the peer's config where the peer was timed beside it."""
    default_ok = default is not None and default.status == "ok"
    counts = job.shared.counts()
    peer_ms, peer_note = None, ""
    if event.kind == "ok":
        ms, note = [timing.confirmed_ms(r) for r in event.value[:len(finalists)]], ""
        if peer is not None:
            rounds = event.value[len(finalists)]
            peer_ms = timing.confirmed_ms(rounds) if rounds else None
            peer_note = "" if rounds else (f"{peer.kernel} ({peer.label}) was not timed beside it: it did not launch, "
                                           f"wrote into its inputs, or was not close enough to the reference")
    else:
        ms = [s.median_ms for s in finalists]
        note = f"re-timing failed ({event.kind}: {event.message}); trial medians used"
    best = min(range(len(finalists)), key=ms.__getitem__)
    default_ms = ms[finalists.index(default)] if default_ok else None
    speedup = default_ms / ms[best] if default_ms else None
    vs_peer = peer_ms / ms[best] if peer_ms else None
    if vs_peer is not None:
        peer_note = f"{vs_peer:.2f}x {peer.kernel} ({peer.label}, {peer_ms:.4g} ms) in the same re-timing"
    note = _join(note, peer_note)
    if not default_ok:
        note = _join(note, f"DEFAULT is {default.status if default else 'not evaluated'}")
    if job.late_failures:
        note = _join(note, f"{len(job.late_failures)} trial(s) not run: {job.late_failures[0]}")
    config = finalists[best].config
    written = job.shared.upsert_winner(config, ms[best], speedup, vs_peer, replace=job.options.replace)
    stored = stored_winner(job.shared)
    if not written:
        note = _join(note, "the store keeps a faster earlier winner")
        kept = next((i for i, s in enumerate(finalists)
                     if stored and config_key(s.config) == config_key(stored["config"])), None)
        if peer_ms and kept is not None:
            kept_vs_peer = peer_ms / ms[kept]
            if job.shared.set_speedup_vs_peer(stored["config"], kept_vs_peer):
                note = _join(note, f"its speedup over {peer.kernel} is now {kept_vs_peer:.2f}x")
    if stored is not None:
        if written:
            stored["trial"] = finalists[best].number
        record_winner(job.shared.study, stored)
    return ProblemResult(job.shared.problem, config, ms[best], default_ms, speedup, counts, written=written,
                         note=note, speedup_vs_peer=vs_peer)


def stored_winner(shared: SharedStudy) -> dict | None:
    """The winner the store holds for the study's device, kernel identity and bucket (what the dispatcher runs), as
    JSON for the study's `winner` attribute; None if the store has none."""
    w = next(_current_winners(shared.store, shared.device.name, shared.kernel, shared.hash, shared.problem), None)
    return None if w is None else {"config": w.config, "median_ms": w.median_ms,
                                   "speedup_vs_default": w.speedup_vs_default, "updated_at": w.updated_at.isoformat()}


def _current_winners(store, device_name: str, kernel: str, source_hash: str, problem: Problem):
    """The stored winners of this kernel identity for the problem's bucket on devices of this name, newest first
    (the dispatcher runs the first)."""
    key = bucket_key(problem)
    return (w for w in store.winners(device_name=device_name, kernel=kernel)
            if w.source_hash == source_hash and bucket_key(w.problem) == key)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)

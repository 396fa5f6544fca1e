"""StudyQueue: the configs this run puts into Optuna's queue, which processes sharing the study pop without overlap.

DEFAULT always goes first, so every problem has a baseline and TPE a known-good start. With TPE the winners of the
nearest buckets already tuned in the same family come next (neighbour_winners): the dispatcher transfers a config to an
untuned bucket only where trials show it beat DEFAULT in each neighbouring bucket (runtime/transfer.py), and buckets
tuned by TPE alone rarely time the same configs. Then the rest of TPE's random start (random_start): configs keep()
admits, drawn uniformly by --seed. TPE's own random start draws from all of SPACE, and about half its proposals were
configs keep() rejects or repeats, each an ask, a tell and a store row, and each counted as a start trial. Asks
made before the start's trials finish (many runners) get the draw's next configs too (push_spare). --sampler grid
queues every config of SPACE not yet in the study (study.grid_order: DEFAULT first, the rest shuffled by --seed),
keep-rejected ones too (they are told pruned when asked), up to the budget of admitted ones.
"""
from __future__ import annotations

import math

from typing import Callable

from .shared import SharedStudy
from ..registry import config_key

ASK_FACTOR, ASK_SLACK = 4, 20   # TPE: at most ASK_FACTOR x trials + ASK_SLACK asks per problem and run
NEIGHBOUR_WINNERS = 3           # winners of the nearest tuned buckets of the family queued after DEFAULT


def neighbour_winners(store, device_name: str, problem, identity: str, default: dict) -> list[dict]:
    """The distinct winners of the nearest other buckets of the problem's family on this device (current kernel
    identity), nearest first, DEFAULT left out."""
    from ..registry import checked_config
    from ..runtime.transfer import distance
    from ..shapes import bucket_key
    own = bucket_key(problem)
    stored = store.winners(device_name=device_name, kernel=problem.kernel, check_config=checked_config)
    found = [w for w in stored if w.source_hash == identity and bucket_key(w.problem) != own
             and math.isfinite(distance(problem, w.problem))]
    found.sort(key=lambda w: (distance(problem, w.problem), bucket_key(w.problem)))
    out, keys = [], {config_key(default)}
    for w in found:
        if config_key(w.config) not in keys and len(out) < NEIGHBOUR_WINNERS:
            keys.add(config_key(w.config))
            out.append(w.config)
    return out


def exchange_configs(store, device, problem, identity: str, default: dict,
                     keep: Callable[[dict], str | None]) -> list[dict]:
    """The exchange pass's configs for one problem (run.exchange): the winners of its nearest buckets as they stand
    now (neighbour_winners), less those ``keep`` (the kernel's keep() for this problem) rejects or raises on, and
    those a trial of its bucket has already evaluated. A suite is tuned one bucket after another, so a bucket's
    search queues only the winners of buckets tuned before it: one tuned early never times what its later
    neighbours found (on an H200, 16 trials left five headline flash_v3 buckets without the PINGPONG config that won
    beside them, 5-12% faster there)."""
    tried = {config_key(t.config) for t in store.trials(device, problem.kernel, identity, problem)
             if t.status != "pruned"}

    def admitted(config: dict) -> bool:
        try:
            return keep(config) is None
        except Exception:  # noqa: BLE001 - a bug in keep: the config is not tried (Search.reject_reason says why)
            return False
    return [c for c in neighbour_winners(store, device.name, problem, identity, default)
            if config_key(c) not in tried and admitted(c)]


def random_start(space: dict, default: dict, reasons: dict, seed: int) -> list[dict]:
    """Configs keep() admits (``reasons``: config key -> reason or None), in the order of study.grid_order's shuffle
    by ``seed``: a uniform draw among them, as TPE's random start is among all of SPACE. StudyQueue.fill takes as many
    as the start leaves room for (``admit``), skipping those the study has seen."""
    from .study import grid_order
    return [c for c in grid_order(space, default, seed)[1:] if reasons.get(config_key(c), "") is None]


class StudyQueue:
    def __init__(self, shared: SharedStudy, reasons: dict, budget: int, lookahead: Callable[[], int]):
        self.shared, self.reasons, self.budget, self.lookahead = shared, reasons, budget, lookahead
        self.unqueued: list[dict] = []          # configs still to queue (top_up)
        self.queued_ahead = 0                   # configs this run queued and has not asked for yet
        self.spare: list[dict] = []             # admitted configs of fill's order past ``admit`` (push_spare)

    def fill(self, order: list[dict], tpe: bool, admit: int | None = None) -> int:
        """Lays out ``order`` (repeats, and configs evaluated, queued or run elsewhere, left out) for top_up to queue
        as asks use the queue up, at most ``admit`` configs keep() admits, those already queued included (and no
        more than the budget leaves); returns how many asks this run may make (``tpe``: room for the sampler's own)."""
        shared = self.shared
        waiting = shared.waiting()
        remaining = max(0, self.budget - shared.evaluated() - shared.live_elsewhere)
        fresh, seen_keys = [], set(shared.seen) | waiting | set(shared.elsewhere)
        admitted_slots = remaining if admit is None else min(remaining, admit)
        admitted_slots -= sum(1 for k in waiting if k in self.reasons and self.reasons[k] is None)
        for config in order:
            key = config_key(config)
            if key in seen_keys:
                continue
            seen_keys.add(key)
            if self.reasons.get(key, "not in SPACE") is None:
                if admitted_slots <= 0:
                    if admit is not None:
                        self.spare.append(config)
                    continue
                admitted_slots -= 1
            fresh.append(config)
        queued = len(waiting) + len(fresh)
        self.unqueued = fresh
        self.top_up()
        return queued + ASK_FACTOR * remaining + ASK_SLACK if tpe else queued

    def top_up(self) -> None:
        """Moves the next configs of ``unqueued`` into Optuna's queue once this run's share of it is used up, a
        lookahead's worth at a time. Not all at once: every ask reads the whole queue (Optuna pops the first waiting
        trial it can claim), so a long queue slows the loop that feeds every GPU. A config that was evaluated, or
        queued or run elsewhere, since the queue was laid out is left out."""
        if self.queued_ahead > 0 or not self.unqueued:
            return
        chunk = []
        while self.unqueued and len(chunk) < max(1, self.lookahead()):
            config = self.unqueued.pop(0)
            key = config_key(config)
            if key not in self.shared.seen and key not in self.shared.elsewhere:
                chunk.append(config)
        for config in chunk:
            self.shared.study.enqueue_trial(config)
        self.queued_ahead += len(chunk)

    def push_spare(self, refuses: Callable[[dict], bool]) -> None:
        """Once this run's queue is used up, queues the next config of ``order`` that fill left out for ``admit``
        (the random start's draw goes on) that ``refuses`` (Search.refuses) admits."""
        if self.queued_ahead > 0 or self.unqueued:
            return
        while self.spare:
            config = self.spare.pop(0)
            if not refuses(config):
                self.shared.study.enqueue_trial(config)
                self.queued_ahead += 1
                return

    def popped(self) -> None:
        """An ask took a trial from the queue."""
        self.queued_ahead = max(0, self.queued_ahead - 1)

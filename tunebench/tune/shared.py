"""SharedStudy: one problem's Optuna study as every process sharing it sees it, and the trial records in the store.

Processes sharing a study (--storage URL, e.g. PostgreSQL, on several hosts) share its budget and never run one
config twice, through Optuna's storage alone: trials finished elsewhere count and are not re-run; of the trials for
one config the lowest-numbered runs and the others stand down (Search.next_ready); a trial whose lower-numbered
peers already fill the budget stands down. The trials of a process that died go stale after the grace period (or at
once, for a process of this host), are failed, and are asked again once (retry_once).

Each trial records its process ("host": hostname:pid) and runner ("runner": run1:gpu1) as user attributes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..registry import config_key
from ..shapes import Problem
from .protocol import Outcome
from .study import open_study
from . import trace

HOST = f"{socket.gethostname()}:{os.getpid()}"


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
    asked_at: float = 0.0       # time.monotonic() when it was asked


def store_offset(study, store, device, kernel_hash: str, problem: Problem) -> int:
    """What this study's trial numbers are shifted by in the store, which keys a bucket's trials by number: one past
    the bucket's highest stored number when the study is created, so that a new study (a lost or other --storage, a
    results.db copied to another machine) adds its trials to the bucket's record rather than overwrite those of an
    earlier study that had the same numbers. Kept in the study (its user attribute `store_offset`), so that every
    process sharing the study shifts alike; 0 for a study from before it (its numbers are the store's already)."""
    found = study.user_attrs.get("store_offset")
    if found is not None:
        return int(found)
    if study.get_trials(deepcopy=False):
        return 0
    stored = store.trials(device, problem.kernel, kernel_hash, problem)
    offset = 1 + max(t.number for t in stored) if stored else 0
    study.set_user_attr("store_offset", offset)
    return offset


class SharedStudy:
    """The study of one problem (device x kernel x kernel identity x bucket): what is known of its trials here and
    elsewhere, and the one writer of their verdicts (store first, then Optuna)."""

    def __init__(self, problem: Problem, space: dict, device, kernel_hash: str, store, storage, sampler):
        import optuna
        self.problem, self.space, self.device, self.store, self.storage = problem, space, device, store, storage
        self.kernel, self.hash = problem.kernel, kernel_hash
        self.study = open_study(storage, sampler, device, kernel_hash, problem)
        self.offset = store_offset(self.study, store, device, kernel_hash, problem)
        self.heartbeats = hasattr(storage, "record_heartbeat") and storage.get_heartbeat_interval() is not None
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
        self.retries: set[int] = set()          # retries queued by retry_once that this run has seen (count_retries)
        self.synced_at = 0.0                    # when sync last read the study

    # -- the study as it stands

    def evaluated(self) -> int:
        return sum(1 for s in self.seen.values() if s.status != "pruned")

    def counts(self) -> dict[str, int]:
        return dict(Counter(s.status for s in self.seen.values()))

    def best_ms(self) -> float | None:
        times = [s.median_ms for s in self.seen.values() if s.status == "ok"]
        return min(times) if times else None

    def waiting(self) -> set[tuple]:
        """The configs in Optuna's queue."""
        from optuna.trial import TrialState
        return {config_key(t.system_attrs.get("fixed_params") or t.params)
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}

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
        from ..store import TrialResult
        lost = [t for t in trials if t.state == TrialState.FAIL and t.number not in self.looked_up
                and set(t.params) == set(self.space) and config_key(t.params) not in seen]
        if not lost:
            return self.found_lost
        self.looked_up.update(t.number for t in lost)
        # By number and config (a study from before store_offset shares the store's numbers with any earlier one).
        stored = {r.number - self.offset: r for r in self.store.trials(self.device, self.kernel, self.hash,
                                                                        self.problem)}
        stored = {t.number: stored[t.number] for t in lost
                  if t.number in stored and stored[t.number].config == dict(t.params)}
        for t in lost:
            deliberate = "message" in t.user_attrs or "duplicate_of" in t.user_attrs  # told FAIL by a live run
            if t.number not in stored and "retry_of" in t.system_attrs and not deliberate:
                stored[t.number] = TrialResult(
                    t.number, dict(t.params), "crashed", message=f"its run died while it ran, twice (trials "
                    f"{t.system_attrs['retry_of']} and {t.number}): not run again")
                self.record_trial(stored[t.number])
            if t.number in stored:
                self.found_lost[config_key(t.params)] = Seen(dict(t.params), stored[t.number].status, t.number,
                                                             stored[t.number].median_ms)
        return self.found_lost

    def fail_dead_owners(self, trials: list) -> list:
        """Fails at once the RUNNING trials of a run on this host whose process is gone (killed with kill -9, say),
        which the heartbeat would fail only a grace period later, with Optuna's stale-trial callback (retry_once)
        after each, as its heartbeat check does; and, from any host, a RUNNING trial that has no "host" a heartbeat
        interval after it started (_never_tagged). Returns the study's trials as they now are."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState
        if not self.heartbeats:
            return trials
        untagged_before = datetime.now() - timedelta(seconds=self.storage.get_heartbeat_interval())
        dead = [t for t in trials if t.state == TrialState.RUNNING and t.number not in self.open
                and (owner_is_dead(t.user_attrs.get("host")) or _never_tagged(t, untagged_before))]
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
        """The retries (retry_once) waiting in the queue join ``retries``: one queued after the search counted the
        queue (a process sharing the study died meanwhile) is one more ask it may make (Search.max_asks)."""
        from optuna.trial import TrialState
        self.retries |= {t.number for t in trials if t.state == TrialState.WAITING and "retry_of" in t.system_attrs}

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

    # -- asking and telling

    def ask(self):
        """A new trial, held open by this run: ``(trial, queued)``, queued when it came from Optuna's queue."""
        with deferred_interrupt():
            trial = self.study.ask()
            self.open[trial.number] = trial
            trial.set_user_attr("host", HOST)  # which process holds it: a run killed before this (_never_tagged)
            if self.heartbeats:
                self.storage.record_heartbeat(trial._trial_id)  # from now on, a killed run leaves a stale trial
        return trial, "fixed_params" in self.storage.get_trial_system_attrs(trial._trial_id)

    def beat(self) -> None:
        """A heartbeat for each trial this run holds open."""
        for trial in self.open.values():
            self.storage.record_heartbeat(trial._trial_id)

    def record(self, candidate: Candidate, outcome: Outcome) -> None:
        """A run's result: the store first (a run stopped between the two writes re-runs the trial rather than lose
        its record), then Optuna. The timings' spread and throughput go to the store alone."""
        from optuna.trial import TrialState
        from ..store import TrialResult
        trial, ok = candidate.trial, outcome.status == "ok"
        attrs = {"status": outcome.status, "runner": candidate.runner,
                 **({"message": outcome.message[:500]} if outcome.message else {})}
        self.record_trial(TrialResult(
            trial.number, candidate.config, outcome.status, outcome.median_ms, outcome.p20_ms, outcome.p80_ms,
            outcome.throughput, outcome.err_ratio, outcome.message, candidate.started_at, _now()))
        self.tell(trial, attrs, outcome.median_ms if ok else None, state=None if ok else TrialState.FAIL)
        self.seen[candidate.key] = Seen(candidate.config, outcome.status, trial.number, outcome.median_ms)

    def record_trial(self, result) -> None:
        """Stores a trial of this study (``result.number``: its Optuna number) under number + offset."""
        stored = dataclasses.replace(result, number=result.number + self.offset)
        self.store.record_trial(self.device, self.kernel, self.hash, self.problem, stored)

    def tell_pruned(self, trial, config: dict, key: tuple, reason: str) -> None:
        from optuna.trial import TrialState
        from ..store import TrialResult
        now = _now()
        self.record_trial(TrialResult(trial.number, config, "pruned", message=reason, started_at=now, finished_at=now))
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
        self.tell_failed(trial, {"duplicate_of": number,
                                 "message": f"the config is running elsewhere (trial {number})"})

    def tell_over_budget(self, trial) -> None:
        self.tell_failed(trial, {"message": "not run: earlier trials (here or in other processes) took the budget"})

    def tell_failed(self, trial, attrs: dict) -> None:
        """FAIL without a status: the trial counts for nothing, and a later run may run its config."""
        from optuna.trial import TrialState
        self.tell(trial, attrs, state=TrialState.FAIL)

    def abandon(self) -> None:
        """Trials this run asked but did not finish go to FAIL without a status, so that a later run may run them."""
        for trial in list(self.open.values()):
            try:
                self.tell_failed(trial, {"message": "abandoned: the run stopped before this trial finished"})
            except Exception as e:  # the storage itself may be what failed; the heartbeat will fail the trial
                print(f"tunebench tune: could not mark trial {trial.number} failed: {e}", file=sys.stderr)

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

    def upsert_winner(self, config: dict, median_ms: float, speedup: float | None,
                      speedup_vs_peer: float | None = None, replace: bool = False) -> bool:
        return self.store.upsert_winner(self.device, self.kernel, self.hash, self.problem, config, median_ms, speedup,
                                        speedup_vs_peer, replace)

    def set_speedup_vs_peer(self, config: dict, speedup_vs_peer: float) -> bool:
        return self.store.set_speedup_vs_peer(self.device, self.kernel, self.hash, self.problem, config,
                                              speedup_vs_peer)


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


def _never_tagged(trial, before: datetime) -> bool:
    """A RUNNING trial with no "host" that started before ``before`` (a heartbeat interval ago): a live run tags
    its trial right after the ask (SharedStudy.ask), so its run died in between, and no one can name it by its
    process. The heartbeat alone would fail it only a grace period later (adopt_orphans), and the other runs of the
    study would wait for it until then. Optuna stamps datetime_start with the asking host's local clock: hosts whose
    clocks differ by more than the heartbeat could fail a live run's trial in the moment before its tag, which
    costs that config one extra run (retry_once), nothing else."""
    started = trial.datetime_start
    return "host" not in trial.user_attrs and started is not None and started < before


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

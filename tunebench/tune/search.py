"""Search: one problem's trials. Ask Optuna for configs, prune what keep() rejects, compile ahead, check and time in
the runners, tell the results (through the problem's SharedStudy); then have the finalists re-timed (confirm).

- --trials counts *evaluated* configs: pruned configs and repeats of a config already evaluated do not count (a repeat
  is told the earlier result, not run again). The sampler may be asked only so often (StudyQueue.fill), so one that
  keeps proposing such configs ends the search early.
- Compile ahead: configs are asked a few at a time; compile workers put them into Triton's on-disk cache while the
  runners check and time earlier ones. A runner takes the first asked config whose compile has finished (or failed:
  the runner then meets the error itself and classifies it).
- Hand-off: once a problem has only compiled configs left to run and a worker is idle, the next problem starts, and
  the last configs run in its background, before its own (hand_off; the fleet serves the search as a Tail).
- Queued runs: a runner busy with a trial is sent the next compiled config to start once it replies (queue_runs),
  so that no GPU waits for this loop, which serves them all, to read a reply and write the result first.
"""
from __future__ import annotations

import bisect
import time
from datetime import datetime, timezone
from typing import Callable

from ..registry import config_key, kernel_identity, kernel_module, module_path
from ..shapes import Problem
from .confirm import Confirmation, ProblemResult, confirm
from .options import TuneOptions
from .pool import CHOOSING_POLL_S, Fleet, Worker
from .progress import Progress
from .protocol import Compile, Event, Outcome, Run, Setup
from .shared import Candidate, SharedStudy
from .enqueue import StudyQueue, neighbour_winners, random_start
from .study import Avoid, all_configs, grid_order, make_sampler, suggest_config, tpe_startup
from . import trace

DEFAULT_TRIALS = 24
REFILL_SYNC_S = 0.5             # refill reads the study at most this often (dispatch reads it before each run)
TPE_AHEAD = 2                   # TPE configs asked ahead of each runner once the random start is done
ASK_BATCH = 2                   # configs asked per turn of the loop: replies are read in between
POLL_S = (0.25, 2.0)            # a run with nothing left to do looks at other processes' open trials this often:
                                # first, and after one of them finished, then twice as long each time, up to the last


class ProblemFailed(RuntimeError):
    """The problem cannot be tuned in this run (its inputs could not be set up in a worker)."""


class Search:
    """The trials of one problem: ask, prune, compile ahead, check and time, tell; then confirm the winner."""

    def __init__(self, problem: Problem, options: TuneOptions, store, storage, fleet: Fleet, device,
                 progress: Progress, exchange: list[dict] | None = None):
        """``exchange``: this search is the problem's share of the exchange pass (run.exchange): it evaluates just
        these configs (those its study has not seen), beyond the budget the problem was tuned with."""
        self.problem, self.options, self.fleet, self.progress = problem, options, fleet, progress
        self.module_path = module_path(problem.kernel)
        self.module = kernel_module(problem.kernel)
        self.space = self.module.SPACE
        # keep() once per config of SPACE: the reason it is rejected for this problem, or None
        self.reasons = {config_key(c): self.reject_reason(c) for c in all_configs(self.space)}
        admitted = sum(1 for reason in self.reasons.values() if reason is None)
        limit = admitted if options.sampler == "grid" else DEFAULT_TRIALS
        self.budget = min(options.trials or limit, admitted)
        self.admitted_share = admitted / len(self.reasons)
        self.shared = SharedStudy(problem, self.space, device, kernel_identity(problem.kernel), store, storage,
                                  make_sampler(options, self.budget, self.admitted_share,
                                               Avoid(self.space, self.refuses)))
        self.shared.sync()
        trace.event("study_loaded")
        if exchange is not None:
            exchange = [c for c in exchange if config_key(c) not in self.shared.seen]
            self.budget = min(self.shared.evaluated() + len(exchange), admitted)
        self.pending: list[Candidate] = []
        self.running: dict[Worker, Candidate] = {}
        self.queued: dict[Worker, Candidate] = {}  # sent to wait behind the runner's trial (Worker.enqueue)
        self.finishing: set[tuple] = set()      # configs run, their results not yet written (step)
        self.compiling: dict[Worker, Candidate] = {}
        self.preparing: set[Worker] = set()
        if self.shared.evaluated() + self.shared.live_elsewhere < self.budget:
            # Trials are to run here: the idle runners build the inputs and references while this process fills
            # Optuna's queue and asks for the first configs (those that an earlier problem leaves idle).
            self.fleet.serve_tails()
            for worker in self.fleet.runners:
                if not worker.busy:
                    self.prepare(worker)
        self.asks = 0
        self.late_failures: list[str] = []      # handed-off trials that could not run (late_reply)
        self.then: Callable[[], None] | None = None     # after a hand-off: the re-timing, once the last trial is in
        self.followed = False                   # another problem's search follows this one in the run (tune)
        self.last_beat = time.monotonic()
        self.poll_s = POLL_S[0] / 2             # await_others: the next look at other processes' trials, halved
        # Without compile workers (--interpret, no spare core) still a config queued per runner, so that a runner
        # that finishes need not wait for an ask (1 simulated worker, 20 ms trials: 66-71% -> 89-95% busy).
        self.wide = len(fleet.runners) + max(len(fleet.compilers), len(fleet.runners))
        # The sampler proposes configs beyond the queue only with TPE; the grid's and the exchange's configs are all
        # queued, and asked at once (they do not depend on results).
        sampled = options.sampler == "tpe" and exchange is None
        self.startup = tpe_startup(self.budget, self.admitted_share) if sampled else self.budget
        self.queue = StudyQueue(self.shared, self.reasons, self.budget, self.lookahead)
        default = self.module.DEFAULT
        if exchange is not None:
            order, admit = exchange, None
        elif not sampled:
            order, admit = grid_order(self.space, default, options.seed), None
        else:
            # TPE's random start queued: DEFAULT, the neighbours' winners, then admitted configs drawn by --seed
            head = [default] + neighbour_winners(store, device.name, problem, self.shared.hash, default)
            order = head + random_start(self.space, default, self.reasons, options.seed)
            admit = max(len(head), self.startup - self.shared.evaluated())
        with trace.span("enqueue"):
            self.ask_limit = self.queue.fill(order, tpe=sampled, admit=admit)
        self.retries_counted = len(self.shared.retries)

    @property
    def max_asks(self) -> int:
        """How many asks this run may make: StudyQueue.fill's count, plus one for each retry queued since
        (retry_once: a process sharing the study died meanwhile; a grid search asks only for what is queued)."""
        return self.ask_limit + len(self.shared.retries) - self.retries_counted

    def refuses(self, config: dict) -> bool:
        """Whether TPE should not propose a config (study.Avoid): keep() rejects it, or it was evaluated, or it is
        asked, running or being written here, or open elsewhere."""
        key = config_key(config)
        return (self.reasons.get(key, "") is not None or key in self.shared.seen or key in self.shared.elsewhere
                or key in self.finishing or any(c.key == key for c in self.pending)
                or any(c.key == key for c in self.running.values())
                or any(c.key == key for c in self.queued.values()))

    def reject_reason(self, config: dict) -> str | None:
        try:
            return self.module.keep(config, self.problem)
        except Exception as e:  # a bug in keep: the config is not compiled, and the reason says why
            return f"keep() raised {type(e).__name__}: {e}"

    # -- the loop

    def tune(self, deliver: Callable[[ProblemResult], None], last: bool = True) -> None:
        """Searches, then has the finalists re-timed in the background: ``deliver`` gets the result once they are
        (from Fleet.wait, during the next problem's search), or at once if there is nothing to re-time. ``last``: no
        problem follows, so nothing will overlap the re-timing (see confirm)."""
        start = time.monotonic()
        self.progress.begin(self.budget, self.shared.evaluated(), self.shared.counts())

        def done(result: ProblemResult) -> None:
            result.wall_s = time.monotonic() - start
            trace.event("confirmed", index=self.progress.index)
            self.progress.end(result)
            deliver(result)

        try:
            self.followed = not last
            self.search(hand_off=self.followed)
        except ProblemFailed as e:
            done(ProblemResult(self.problem, counts=self.shared.counts(), note=str(e)))
            return
        trace.event("searched", index=self.progress.index, running=len(self.running), queued=len(self.queued),
                    pending=len(self.pending))
        job = Confirmation(self.fleet, self.options, self.shared, self.module_path, self.module.DEFAULT,
                           self.progress.index, self.late_failures)
        if self.running or self.pending:
            self.hand_off(lambda: confirm(job, done, share=False))
        else:
            confirm(job, done, share=last)

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
        """Whether all that is left of this search is to run configs already compiled, and to wait for those running:
        no config is left to ask or compile, and no other process has a trial of this study open (a run that shares
        the study waits for those, await_others). The next search starts then, while every runner may still be
        busy here: it opens its study and asks its first configs meanwhile, so that a runner freed from this one's
        last trials finds the next one's waiting (waiting for an idle worker first left each freed runner ~5 ms
        idle per problem: 8 simulated workers on the default suite's flash_v2 problems, 76-81% -> 91-94% busy)."""
        if not (self.running or self.pending) or self.compiling or self.preparing:
            return False
        if any(not c.compiled for c in self.pending):
            return False
        if self.asks < self.max_asks and self.under_budget():
            return False
        if self.shared.live_elsewhere or time.monotonic() - self.shared.synced_at >= REFILL_SYNC_S:
            self.shared.sync()  # another process's trial that may yet need running here keeps this search going
        return not self.shared.live_elsewhere

    def live(self) -> int:
        return len(self.pending) + len(self.running) + len(self.queued)

    def busy(self) -> bool:
        """Whether a worker is serving this search (the fleet may also serve an earlier problem's re-timing)."""
        return bool(self.running or self.compiling or self.preparing)

    def under_budget(self) -> bool:
        """Whether the evaluated and open trials, here and elsewhere, leave room for another."""
        return self.shared.evaluated() + self.live() + self.shared.live_elsewhere < self.budget

    def wants_more(self) -> bool:
        return self.asks < self.max_asks and self.under_budget() and self.live() < self.lookahead()

    def lookahead(self) -> int:
        """How many configs may be asked before their results are in. Grid configs and TPE's random start do not
        depend on results: as many as the runners and compile workers can take. After that TPE proposes from the
        results so far, and a wide batch of guesses (constant liar) makes it little better than random at a small
        budget; so TPE_AHEAD per runner: enough to keep each GPU fed from a compile started ahead, no more
        (bench/search_efficiency.py measures the effect on a GPU)."""
        if self.shared.evaluated() + self.live() < self.startup:
            return self.wide
        return min(self.wide, len(self.fleet.runners) * (1 + TPE_AHEAD))

    def await_others(self) -> bool:
        """Nothing is left to do here, but other processes sharing the study may still have trials open: waits for
        them. Their results may change the winner; and the trials of a process that died go stale, are failed, and
        their share of the budget is run again (here, if no one else does). False once none is open elsewhere.
        It looks every POLL_S[0] s at first and after one of them finished, backing off to POLL_S[1] s: a 2 s poll
        alone left a host idle ~2 s at the end of each problem on PostgreSQL while the other took the next one's
        trials; the backoff costs a few reads of the study per finished trial elsewhere."""
        before = self.shared.live_elsewhere
        self.shared.sync()
        if not self.shared.live_elsewhere:
            return self.wants_more()
        self.poll_s = POLL_S[0] if self.shared.live_elsewhere < before else min(2 * self.poll_s, POLL_S[1])
        time.sleep(min(self.poll_s, self.options.heartbeat_s))
        self.heartbeat()
        return True

    def refill(self) -> None:
        if self.wants_more() and time.monotonic() - self.shared.synced_at >= REFILL_SYNC_S:
            # Other processes may have taken the rest of the budget since the last look. Not on every step: a look
            # reads the whole study, and one process's loop serves all its GPUs. A trial asked over the budget in
            # the meantime stands down in next_ready, which reads the study again before anything runs.
            self.shared.sync()
        for _ in range(ASK_BATCH):
            if not self.wants_more():
                break
            with trace.span("ask"):
                self.ask()

    def ask(self) -> None:
        if len(self.shared.seen) < self.startup:
            # Many runners ask past the queued start before its trials finish, and TPE draws over all of SPACE
            # until `startup` are (at 8 simulated workers ~4 rejected configs per problem): the random draw goes on.
            self.queue.push_spare(self.refuses)
        self.queue.top_up()
        trial, queued = self.shared.ask()
        self.asks += 1
        if queued:
            self.queue.popped()
        config = suggest_config(trial, self.space)
        key = config_key(config)
        if key in self.shared.seen:
            self.shared.tell_repeat(trial, self.shared.seen[key])
            return
        reason = self.reasons.get(key, "outside SPACE")
        if reason is not None:
            self.shared.tell_pruned(trial, config, key, reason)
            return
        self.pending.append(Candidate(trial, config, key, compiled=not self.fleet.compilers,
                                      asked_at=time.monotonic()))

    # -- the workers

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
            self.shared.sync()
        for worker in [w for w in self.fleet.runners if not w.busy]:
            candidate = self.next_ready()
            if candidate is None:
                if self.pending and not late:
                    self.prepare(worker)
                continue
            candidate.started_at = datetime.now(timezone.utc)
            worker.submit(self.take(candidate, worker), self.options.timeout)
            self.running[worker] = candidate
            if late:
                self.reply_late(worker)
        if self.options.queue_runs:
            self.queue_runs()

    def queue_runs(self) -> None:
        """Gives each runner busy with a trial of this search the next compiled config to run after it (Worker.enqueue),
        so that it starts it without waiting for this loop to read the reply and send it: with 8 simulated runners
        of 20 ms trials, the gap between one trial and the next was ~1 ms on average, and up to 8 ms while the loop
        wrote other results. Idle runners are served first (dispatch_runs); no runner holds more than one waiting.
        A handed-off search queues too: the reply to the queued config comes back to it as well (late_reply).

        A queued config may wait behind a long trial while another runner is idle. Where another problem follows,
        that runner takes the next problem's configs; so the run's last problem queues none. (Trial durations drawn
        from the store's, mean 193 ms and long-tailed, 8 runners: queueing in the last problem too, even only while
        as many configs were pending as there were runners, took the search window from 16.9 s to 18.3 s in 3 of 8
        runs: its last config waited behind a 2 s trial.)"""
        if not self.followed:
            return
        slots = [w for w in self.running if w not in self.queued and w.can_enqueue(self.problem, self.options.seed)]
        if not slots or not self.pending:
            return
        if self.shared.synced_at < max(c.asked_at for c in self.pending):
            self.shared.sync()  # as dispatch_runs: other processes' trials, read after this one was asked
        for worker in slots:
            candidate = self.next_ready()
            if candidate is None:
                return
            worker.enqueue(self.take(candidate, worker), self.options.timeout)
            self.queued[worker] = candidate

    def take(self, candidate: Candidate, worker: Worker) -> Run:
        """A pending config given to ``worker`` (to run now, or after its trial): out of ``pending``, its runner
        named, its Run request."""
        self.pending.remove(candidate)
        gpu = "" if worker.visible_device is None else f":gpu{worker.visible_device}"
        candidate.runner = f"{worker.name}{gpu}"
        return Run(self.module_path, self.problem, self.options.seed, candidate.config)

    def prepare(self, worker: Worker) -> None:
        """An idle runner builds the problem's inputs and references (while the first configs are asked and
        compiled), once."""
        if worker.loaded != (self.problem, self.options.seed):
            worker.submit(Setup(self.problem, self.options.seed, self.module_path), self.options.setup_timeout)
            self.preparing.add(worker)

    def next_ready(self) -> Candidate | None:
        """The first pending config that is compiled and not already running; repeats of finished ones are told.

        Across processes, of the trials for one config the lowest-numbered runs and the others stand down. Optuna
        numbers trials one at a time per study, so every lower-numbered trial exists when a trial is dispatched;
        one whose config is not all written yet holds higher ones back until it is. So no config runs twice, and
        no two trials stand down for each other. Likewise a trial stands down if the trials numbered below it that
        have or may yet have a verdict already fill the budget: a budget shared by processes is never overrun."""
        shared = self.shared
        running = {c.key for c in [*self.running.values(), *self.queued.values()]} | self.finishing
        for candidate in list(self.pending):
            number = candidate.trial.number
            if candidate.key in shared.seen:
                self.pending.remove(candidate)
                shared.tell_repeat(candidate.trial, shared.seen[candidate.key])
            elif shared.elsewhere.get(candidate.key, number) < number:
                self.pending.remove(candidate)
                shared.tell_running_elsewhere(candidate.trial, shared.elsewhere[candidate.key])
            elif bisect.bisect_left(shared.claims, number) >= self.budget:
                self.pending.remove(candidate)
                shared.tell_over_budget(candidate.trial)
            elif candidate.compiled and candidate.key not in running and not any(n < number for n in shared.choosing):
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
            self.release(worker)  # abandoned with the other open trials: not this config's fault
            raise ProblemFailed(event.message)
        self.release(worker)
        self.finishing.add(candidate.key)  # not run again while its result is being written
        return candidate, outcome

    def release(self, worker: Worker) -> None:
        """The runner's trial is over; the config queued behind it, if any, is now its trial (Worker._finish)."""
        del self.running[worker]
        queued = self.queued.pop(worker, None)
        if queued is not None:
            queued.started_at = datetime.now(timezone.utc)
            self.running[worker] = queued

    def finish(self, candidate: Candidate, outcome: Outcome) -> None:
        """Writes a run's result (store, then Optuna): it is no longer one being written (``finishing``)."""
        self.finishing.discard(candidate.key)
        shared = self.shared
        with trace.span("finish"):
            shared.record(candidate, outcome)
            self.progress.trial(candidate.trial.number, candidate.config, outcome, shared.evaluated(),
                                shared.counts(), shared.best_ms())

    def heartbeat(self) -> None:
        import optuna
        if not self.shared.heartbeats or time.monotonic() - self.last_beat < self.options.heartbeat_s:
            return
        self.last_beat = time.monotonic()
        self.shared.beat()
        self.fleet.beat_tails()  # the trials of earlier problems still finishing
        optuna.storages.fail_stale_trials(self.shared.study)  # the trials of another process that died

    def abandon(self, replace_busy: bool) -> None:
        """Trials this run asked but did not finish go to FAIL without a status, so that a later run may run them;
        ``replace_busy``: the workers still serving this search are replaced, so that no late reply reaches the next."""
        if replace_busy:
            for worker in list(self.running) + list(self.compiling) + list(self.preparing):
                worker.cancel()
        self.shared.abandon()
        self.pending, self.running, self.queued, self.compiling, self.preparing = [], {}, {}, {}, set()

    # -- handed off: the fleet serves the last configs as a Tail

    def hand_off(self, then: Callable[[], None]) -> None:
        """The next problem starts now, and this one's last configs run in its background: they go to idle runners
        before the next problem's (Fleet.serve_tails), their results are told as they come (late_reply), and
        ``then`` (the re-timing) follows the last of them. Meanwhile the next problem's first configs compile, and
        the runners move on to it without waiting for them, rather than idle while they compile."""
        self.then = then
        self.progress.late = True
        self.fleet.hand_off(self)
        for worker in self.running:
            self.reply_late(worker)

    def reply_late(self, worker: Worker) -> None:
        """The reply of a run of this handed-off search comes back as a background one, to late_reply."""
        self.fleet.redirect(worker, lambda event: self.late_reply(worker, event))

    def serve(self) -> None:
        """A handed-off search's share of the idle runners (Fleet.serve_tails)."""
        if self.pending:
            self.dispatch_runs(late=True)
            self.finish_late()

    def beat(self) -> None:
        self.shared.beat()

    def late_reply(self, worker: Worker, event: Event) -> None:
        """A handed-off trial's result, told as in the search."""
        candidate = self.running[worker]
        try:
            finished = self.on_event(worker, event)
            if finished is not None and self.pending:
                self.dispatch_runs(late=True)  # the freed runner's next config first, then the writes
        except ProblemFailed as e:
            # The worker could not run the problem (its setup failed): the trial is left without a verdict for a
            # later run to run, and the winner comes from the rest.
            self.late_failures.append(str(e))
            self.shared.tell_failed(candidate.trial, {"message": f"abandoned: {e}"[:500]})
            finished = None
        if worker in self.running:  # the config queued behind the trial is running now: its reply comes here too
            self.reply_late(worker)
        if finished is not None:
            self.finish(*finished)
        self.finish_late()

    def finish_late(self) -> None:
        """Once a handed-off search has nothing left to run: its re-timing."""
        if not self.running and not self.pending and self.fleet.retire(self):
            self.then()

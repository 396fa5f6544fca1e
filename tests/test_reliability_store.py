"""Reliability of the embedded stores under concurrency: many processes on one Optuna study in SQLite and in the
journal file (opened through the tuner's own storage setup), winner upserts raced by 16 processes, and the dispatcher
reading while they write.

Child processes come from a forkserver that preloads what they import (8-16 spawned imports of torch would cost
~5 s each on a 2-core CI machine); each child still opens its own connections to a database none of them created.
Every figure printed here is quoted in the README's Reliability section."""
import multiprocessing
import os
import random
import time
import traceback
import warnings

import pytest

from tunebench import registry
from tunebench.device import DeviceIdentity
from tunebench.shapes import Problem
from tunebench.store import Store, resolve_url

H100 = DeviceIdentity("NVIDIA H100 80GB HBM3", "9.0", 132, 85_000_000_000, "550.54.15", "2.13.0", "3.6.0", True)
PROBLEM = Problem("flash_v2", 1, 2, 1, 64, 64, 32, "float16", causal=True)
PRELOAD = ["tunebench.tune.run", "tunebench.store", "tunebench.runtime.dispatch", "optuna",
           "optuna.storages._rdb.storage", "alembic.migration", "pytest"]


def forkserver():
    # Only takes effect if no test has started the forkserver yet (test_store's own list is a subset of this one).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_all(ctx, target, args_per_process, timeout=600) -> list[str]:
    """Starts one process per args tuple (each gets a shared barrier and result queue appended); their replies."""
    barrier, results = ctx.Barrier(len(args_per_process)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for args in args_per_process]
    for p in procs:
        p.start()
    replies = [results.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return replies


def reply_errors(replies) -> list[str]:
    return [r for r in replies if not (isinstance(r, tuple) and r[0] == "ok")]


# -- 8 processes x 200 trials on one Optuna study


SPACE = {"BLOCK": [16, 32, 64, 128], "WARPS": [1, 2, 4, 8], "STAGES": [1, 2, 3]}


def _optuna_process(storage_url: str, n: int, barrier, results) -> None:
    try:
        import optuna
        from tunebench.tune.study import open_storage, quiet_optuna, suggest_config
        quiet_optuna()
        barrier.wait(120)
        start = time.monotonic()
        storage = open_storage(storage_url, "sqlite://")  # all 8 open (and may create) the file at once
        study = optuna.create_study(storage=storage, study_name="shared", direction="minimize", load_if_exists=True,
                                    sampler=optuna.samplers.RandomSampler(seed=os.getpid()))
        for _ in range(n):
            trial = study.ask()
            storage.record_heartbeat(trial._trial_id)  # as the tuner does: a killed process leaves a stale trial
            config = suggest_config(trial, SPACE)
            study.tell(trial, config["BLOCK"] / config["WARPS"] + config["STAGES"])
        results.put(("ok", time.monotonic() - start))
    except BaseException:
        results.put(traceback.format_exc())


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_8_processes_x_200_trials_on_one_study(tmp_path, kind):
    import optuna
    from optuna.trial import TrialState
    from tunebench.tune.study import open_storage
    url = {"sqlite": f"sqlite:///{tmp_path / 'studies.optuna.db'}",
           "journal": str(tmp_path / "studies.optuna.journal")}[kind]  # the --storage URL, or the default file
    processes, per_process = 8, 200
    start = time.monotonic()
    replies = run_all(forkserver(), _optuna_process, [(url, per_process)] * processes)
    wall = time.monotonic() - start
    errors = reply_errors(replies)
    lock_errors = [e for e in errors if "database is locked" in e]
    assert not errors, f"{len(lock_errors)} lock errors; first error:\n{errors[0]}"
    trials = optuna.load_study(study_name="shared", storage=open_storage(url, "sqlite://")).get_trials(
        deepcopy=False)
    states = {s: sum(1 for t in trials if t.state == s) for s in (TrialState.COMPLETE, TrialState.RUNNING)}
    numbers = sorted(t.number for t in trials)
    print(f"optuna {kind}: {processes} processes x {per_process} trials: {states[TrialState.COMPLETE]} complete, "
          f"{states[TrialState.RUNNING]} running, {len(lock_errors)} lock errors, {wall:.0f} s wall")
    assert len(trials) == states[TrialState.COMPLETE] == processes * per_process
    assert states[TrialState.RUNNING] == 0
    assert numbers == list(range(processes * per_process))  # no duplicate (or skipped) trial number


# -- 16 processes racing winner upserts, while a reader process loads what the dispatcher loads


def configs_for(problem: Problem) -> list[dict]:
    from tunebench.tune.study import all_configs
    module = registry.kernel_module(problem.kernel)
    return [c for c in all_configs(module.SPACE) if module.keep(c, problem) is None]


def planned_upserts(writers: int, per_writer: int, seed: int = 11) -> list[list[tuple[int, float]]]:
    """(config index, time) per upsert and writer; every time is distinct, so a (config, time) pair read back names
    the one upsert that wrote it, and a row mixing two upserts is caught."""
    rng = random.Random(seed)
    times = rng.sample(range(1_000, 1_000_000), writers * per_writer)
    return [[(rng.randrange(len(configs_for(PROBLEM))), times[w * per_writer + i] / 1000.0)
             for i in range(per_writer)] for w in range(writers)]


def _upsert_process(url: str, shash: str, plan: list, barrier, results) -> None:
    try:
        configs = configs_for(PROBLEM)
        barrier.wait(120)
        store = Store(url)  # every writer opens (and may create) the database at the same moment
        written = 0
        for i, ms in plan:
            written += store.upsert_winner(H100, "flash_v2", shash, PROBLEM, configs[i], ms, 1.0)
            time.sleep(0.005)  # spread the writes over the reader's loop, as tuners' upserts are spread
        store.close()
        results.put(("ok", written))
    except BaseException:
        results.put(traceback.format_exc())


def _reader_process(url: str, pairs: set, stop, barrier, results) -> None:
    """Loops what the dispatcher does on its first call, plus Store.winners, until the writers are done."""
    try:
        from tunebench.runtime.dispatch import Dispatcher, Winners
        configs = configs_for(PROBLEM)
        pairs = {(tuple(sorted(configs[i].items())), ms) for i, ms in pairs}
        barrier.wait(120)
        reads, seen, bests = 0, 0, set()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a skipped (malformed) row warns: make it fail the reader
            while not stop.is_set() or reads < 20:
                if not os.path.exists(url.removeprefix("sqlite:///")):
                    continue  # no writer has created it yet: the dispatcher would read nothing here either
                try:
                    winners = Store(url, readonly=True).winners(device_name=H100.name)
                except Exception as e:
                    if "not a tunebench results database" in str(e):
                        continue  # created, its tables not yet committed: the dispatcher warns and falls back
                    raise
                reads += 1
                for w in winners:
                    assert (tuple(sorted(w.config.items())), w.median_ms) in pairs, f"torn row: {w}"
                if winners:  # (with none yet, the dispatcher runs DEFAULT and warns once: not a malformed row)
                    choice = Dispatcher(Winners.load(H100.name, [url])).choose(PROBLEM)
                    seen += 1
                    bests.add(winners[0].median_ms)
                    assert choice is not None and choice.config in configs
        results.put(("ok", reads, seen, len(bests)))
    except BaseException:
        results.put(traceback.format_exc())


def test_16_writers_end_on_the_global_minimum_while_the_dispatcher_reads(tmp_path):
    ctx = forkserver()
    db = tmp_path / "results.db"
    url = resolve_url(str(db))
    writers, per_writer = 16, 25
    plans = planned_upserts(writers, per_writer)
    pairs = {pair for plan in plans for pair in plan}
    stop, barrier, results = ctx.Event(), ctx.Barrier(writers + 1), ctx.Queue()
    reader = ctx.Process(target=_reader_process, args=(url, pairs, stop, barrier, results))
    shash = registry.kernel_identity("flash_v2")  # the dispatcher ignores winners of another source
    procs = [ctx.Process(target=_upsert_process, args=(url, shash, plan, barrier, results)) for plan in plans]
    start = time.monotonic()
    for p in [reader] + procs:
        p.start()
    replies = []
    for _ in procs:
        replies.append(results.get(timeout=300))
    stop.set()
    replies.append(results.get(timeout=300))
    for p in [reader] + procs:
        p.join(timeout=30)
    wall = time.monotonic() - start
    errors = reply_errors(replies)
    assert not errors, errors[0]
    (reader_reply,) = [r for r in replies if len(r) == 4]
    _, reads, reads_with_winner, bests_seen = reader_reply
    (winner,) = Store(str(db), readonly=True).winners()
    best_index, best_ms = min((pair for plan in plans for pair in plan), key=lambda pair: pair[1])
    print(f"winner upserts: {writers} processes x {per_writer}, reader: {reads} reads ({reads_with_winner} with a "
          f"winner, {bests_seen} successive bests), 0 failures, 0 torn rows, {wall:.1f} s wall")
    assert winner.median_ms == best_ms and winner.config == configs_for(PROBLEM)[best_index]
    assert bests_seen >= 2, bests_seen  # it read while the winner was still improving, not only after
    assert sum(r[1] for r in replies if len(r) == 2) >= 1

"""Crash and resume: `tunebench tune --interpret` killed with SIGKILL mid-study and started again; a config that kills
its own run (tests/fake_kernels/deadly.py) retried once and then recorded crashed; a trial whose result reached the
store just before its run died keeps that result.

No finished trial may be lost or run again, every study completes its budget, and no trial is left RUNNING. The
grace period is set far beyond the tests' length: a killed run's trials must be failed because its process is gone,
not because its heartbeat went stale minutes later."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

TESTS = pathlib.Path(__file__).parent
sys.path.insert(0, str(TESTS))  # fake_kernels, here and in spawned workers

from tunebench import registry  # noqa: E402
from tunebench.shapes import Problem  # noqa: E402
from tunebench.store import Store  # noqa: E402
from tunebench.commands.problems import select_problems  # noqa: E402
from tunebench.tune.options import TuneOptions  # noqa: E402
from tunebench.tune.run import tune  # noqa: E402
from tunebench.registry import config_key  # noqa: E402
from tunebench.tune.study import open_storage, study_name  # noqa: E402

GRACE_S = "3600"


def tunebench_command() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "tunebench"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tunebench.cli"]


def optuna_file(db: pathlib.Path) -> pathlib.Path:
    return db.with_name(db.stem + ".optuna.journal")


def all_trials(path: pathlib.Path) -> list | None:
    """(study name, trial) of every trial in the Optuna journal as a run writes it (a reader reads only complete
    lines); None before the file exists."""
    if not path.exists():
        return None
    from tunebench.tune.journal import JournalStudies
    storage = JournalStudies(path)
    return [(s.study_name, t) for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)]


def finished_and_open(path: pathlib.Path) -> tuple[int, int]:
    """Trials complete, and trials running in a process that has named itself (its "host" attribute)."""
    trials = [t for _, t in all_trials(path) or []]
    return (sum(1 for t in trials if t.state.name == "COMPLETE"),
            sum(1 for t in trials if t.state.name == "RUNNING" and "host" in t.user_attrs))


def left_running(path: pathlib.Path) -> list[tuple[str, int]]:
    return [(name, t.number) for name, t in all_trials(path) or [] if t.state.name == "RUNNING"]


def descendants(pid: int) -> list[int]:
    """The processes under ``pid``: its workers are children of its forkserver (tunebench.tune.startup), or its own."""
    parents = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def alive(pid: int) -> bool:
    try:
        return (pathlib.Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stored(db: pathlib.Path, problems) -> dict:
    """(problem, trial number) -> (config, status, started_at) of every trial in the store."""
    with Store(str(db), readonly=True) as store:
        return {(p.label(), t.number): (t.config, t.status, t.started_at)
                for p in problems for t in store.trials(problem=p)}


def optuna_trials(db: pathlib.Path, device, problem: Problem):
    import optuna
    name = study_name(device, problem.kernel, registry.kernel_identity(problem.kernel), problem)
    return optuna.load_study(study_name=name, storage=open_storage(None, f"sqlite:///{db}")).get_trials(
        deepcopy=False)


def cpu_device():
    from tunebench.device import DeviceIdentity
    return DeviceIdentity.current(interpret=True)


@pytest.mark.interpreter
@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_sigkill_mid_study_then_resume(tmp_path):
    db = tmp_path / "results.db"
    trials = 4
    args = tunebench_command() + ["tune", "--interpret", "--kernel", "flash_v1", "--suite", "tiny", "--trials",
                                  str(trials), "--sampler", "grid", "--db", str(db)]
    env = dict(os.environ, TUNEBENCH_GRACE_S=GRACE_S)
    run = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:  # some trials finished, and one is running
        finished, running = finished_and_open(optuna_file(db))
        if finished >= 2 and running >= 1:
            break
        assert run.poll() is None, f"the run ended before it could be killed: {run.stderr.read()}"
        assert time.monotonic() < deadline, "no trial finished in 300 s"
        time.sleep(0.02)
    workers = descendants(run.pid)
    run.send_signal(signal.SIGKILL)
    run.wait()
    run.stderr.close()
    problems = select_problems(["flash_v1"], "tiny", None, interpret=True)
    before = stored(db, problems)
    # The trials left running: the one a worker ran and the one asked ahead for it (--interpret has no compile
    # workers, so a config per runner is queued), in the first problem's study or (a later kill) the next one's.
    killed_trials = left_running(optuna_file(db))
    assert 1 <= len(killed_trials) <= 2, killed_trials
    assert len(workers) >= 1
    until = time.monotonic() + 30
    while any(alive(w) for w in workers) and time.monotonic() < until:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers), "workers outlived their killed run"

    start = time.monotonic()
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    resume_s = time.monotonic() - start
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = stored(db, problems)
    print(f"kill -9 after {len(before)} stored trials, {len(killed_trials)} left running; resumed in {resume_s:.0f} s")

    assert {k: v for k, v in after.items() if k in before} == before  # no finished trial lost or rewritten
    names = {study_name(cpu_device(), p.kernel, registry.kernel_identity(p.kernel), p): p.label() for p in problems}
    killed_in = {(names[name], number) for name, number in killed_trials}
    retried = []
    for p in problems:
        rows = [(config, status) for (label, _), (config, status, _) in after.items() if label == p.label()]
        keys = Counter(config_key(config) for config, _ in rows)
        assert max(keys.values()) == 1, keys  # no config ran twice
        assert sum(1 for _, status in rows if status != "pruned") == trials  # each study completed its budget
        optuna_rows = optuna_trials(db, cpu_device(), p)
        assert not [t.number for t in optuna_rows if t.state.name == "RUNNING"]
        for killed in [t for t in optuna_rows if (p.label(), t.number) in killed_in]:
            assert killed.state.name == "FAIL" and (p.label(), killed.number) not in after
            (retry,) = [t for t in optuna_rows if t.system_attrs.get("retry_of") == killed.number]
            # Retried once, the whole config: a grid trial killed while writing its parameters has them queued.
            assert retry.params == (killed.system_attrs.get("fixed_params") or killed.params)
            retried.append(after.get((p.label(), retry.number), (None, "not run: the budget was met"))[1])
    # A retry runs unless the budget was met without it (the queued one's, after a later kill).
    assert len(retried) == len(killed_trials) and "ok" in retried
    assert set(retried) <= {"ok", "not run: the budget was met"}


# -- a config that kills its run, twice


DEADLY = Problem("fake_deadly", 1, 2, 1, 24, 40, 16, "float32", causal=True)
RUN_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from tunebench import registry
from tunebench.shapes import Problem
from tunebench.tune.options import TuneOptions
from tunebench.tune.run import tune
registry.KERNELS["fake_deadly"] = "fake_kernels.deadly"
problem = Problem("fake_deadly", 1, 2, 1, 24, 40, 16, "float32", causal=True)
tune([problem], TuneOptions(interpret=True, sampler="grid", seed=int(sys.argv[3]), trials=4, db=sys.argv[2],
                            timeout=30.0))
"""




def launches(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_config_that_kills_its_run_is_retried_once_then_crashed(tmp_path, monkeypatch):
    from fake_kernels import admitted_grid_order, deadly
    monkeypatch.setitem(registry.KERNELS, DEADLY.kernel, "fake_kernels.deadly")  # to read its rows back here
    # Two correct configs finish before the deadly one; the third comes after it.
    seed = next(s for s in range(200) if [c["MODE"] for c in admitted_grid_order(deadly, s, DEADLY)] ==
                ["ok", "ok", "kill_run", "ok"])
    db, log = tmp_path / "results.db", tmp_path / "launches.jsonl"
    env = dict(os.environ, TUNEBENCH_GRACE_S=GRACE_S, TUNEBENCH_FAKE_LOG=str(log))
    codes, snapshots = [], []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(TESTS), str(db), str(seed)], env=env,
                              capture_output=True, text=True, timeout=300)
        codes.append(done.returncode)
        snapshots.append(stored(db, [DEADLY]))
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0], done.stderr[-3000:]
    for earlier, later in zip(snapshots, snapshots[1:]):
        assert {k: v for k, v in later.items() if k in earlier} == earlier  # nothing finished is lost or re-run

    assert len([e for e in launches(log) if e["config"]["MODE"] == "kill_run"]) == 2  # once, and one retry
    with Store(str(db), readonly=True) as store:
        rows = store.trials(kernel="fake_deadly")
        (winner,) = store.winners()
    verdicts = {config_key(t.config): t for t in rows if t.status != "pruned"}
    assert len(verdicts) == sum(1 for t in rows if t.status != "pruned") == 4  # the budget, each config once
    crashed = verdicts[config_key({"MODE": "kill_run", "X": 1})]
    assert crashed.status == "crashed" and "twice" in crashed.message, crashed
    assert winner.config["MODE"] == "ok"
    assert not [t.number for t in optuna_trials(db, cpu_device(), DEADLY) if t.state.name == "RUNNING"]


# -- a run killed between writing a trial's result to the store and telling Optuna


def test_a_result_stored_before_its_run_died_is_kept_not_rerun(tmp_path, monkeypatch):
    import optuna
    from tunebench.store import TrialResult
    from tunebench.tune.study import suggest_config
    monkeypatch.setitem(registry.KERNELS, "fake_plain", "fake_kernels.plain")
    problem = Problem("fake_plain", 1, 2, 1, 24, 40, 16, "float32", causal=True)
    db, device, shash = tmp_path / "results.db", cpu_device(), registry.kernel_identity("fake_plain")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no process has now: the dead run's
    store = Store(str(db))
    study = optuna.create_study(storage=open_storage(None, store.url), direction="minimize",
                                study_name=study_name(device, "fake_plain", shash, problem))
    study.enqueue_trial({"X": 5})
    trial = study.ask()
    config = suggest_config(trial, registry.kernel_module("fake_plain").SPACE)
    trial.set_user_attr("host", f"{socket.gethostname()}:{gone.pid}")
    store.record_trial(device, "fake_plain", shash, problem, TrialResult(trial.number, config, "ok", 0.5, 0.4, 0.6))
    store.close()

    [result] = tune([problem], TuneOptions(interpret=True, trials=3, db=str(db), timeout=60.0))
    rows = Store(str(db), readonly=True).trials(kernel="fake_plain")
    assert [(t.number, t.median_ms) for t in rows if t.config == {"X": 5}] == [(trial.number, 0.5)]
    assert sum(1 for t in rows if t.status == "ok") == 3  # it counted toward --trials
    after = optuna_trials(db, device, problem)
    assert next(t for t in after if t.number == trial.number).state.name == "FAIL"
    (retry,) = [t for t in after if t.system_attrs.get("retry_of") == trial.number]
    assert retry.user_attrs.get("duplicate_of") == trial.number  # the queued retry was told, not run
    assert not [t for t in after if t.state.name == "RUNNING"]
    assert result.config is not None

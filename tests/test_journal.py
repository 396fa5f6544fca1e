"""The Optuna journal file (tunebench/tune/journal.py): what it keeps across opens and processes, what a torn or
corrupt line does, its heartbeats, and where `tunebench tune` puts it."""
import json
import os
import subprocess
import sys
import time
import warnings

import pytest

from tunebench.tune.journal import AppendLog, JournalError, JournalStudies, JournalWarning
from tunebench.tune.study import check_storage, open_storage, retry_once

OP = {"op_code": 2, "worker_id": "w", "study_id": 0}


def op(i: int, **extra) -> dict:
    return {**OP, "user_attr": {"i": i, **extra}}


def quiet_study(storage, name="s"):
    import optuna
    from tunebench.tune.study import quiet_optuna
    quiet_optuna()
    return optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)


def test_a_journal_keeps_the_studies_and_optunas_own_reader_reads_it(tmp_path):
    import optuna
    path = tmp_path / "s.journal"
    study = quiet_study(JournalStudies(path))
    for x in (3.0, 1.0, 2.0):
        trial = study.ask()
        trial.suggest_categorical("BLOCK", [16, 32])
        trial.set_user_attr("status", "ok")
        study.tell(trial, x)
    again = quiet_study(JournalStudies(path))
    assert [t.value for t in again.trials] == [3.0, 1.0, 2.0] and again.best_value == 1.0
    assert all(t.user_attrs == {"status": "ok"} for t in again.trials)
    theirs = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path))))  # the format of Optuna's file backend
    assert [(t.params, t.value) for t in theirs.trials] == [(t.params, t.value) for t in again.trials]


def test_reads_see_only_lines_whose_newline_is_there(tmp_path):
    path = tmp_path / "j.journal"
    log = AppendLog(path)
    log.append_logs([op(0), op(1)])
    line = json.dumps(op(2)).encode() + b"\n"
    with open(path, "ab") as f:
        f.write(line[:10])  # a write under way, as another process's reader may see it
    assert [x["user_attr"]["i"] for x in log.read_logs(0)] == [0, 1]
    assert log.read_logs(2) == []
    with open(path, "ab") as f:
        f.write(line[10:])
    assert [x["user_attr"]["i"] for x in log.read_logs(2)] == [2]
    assert [x["user_attr"]["i"] for x in log.read_logs(0)] == [0, 1, 2]  # a fresh replay reads it all again


def test_a_torn_last_line_is_cut_off_with_a_warning_and_appends_go_on(tmp_path):
    path = tmp_path / "j.journal"
    writer = AppendLog(path)
    writer.append_logs([op(0), op(1)])
    whole = path.stat().st_size
    with open(path, "ab") as f:
        f.write(json.dumps(op(2)).encode()[:17])  # its writer was killed inside write()
    reader = AppendLog.__new__(AppendLog)
    with pytest.warns(JournalWarning, match="torn last line"):
        reader.__init__(path)  # opening the file cuts it off
    assert path.stat().st_size == whole
    with open(path, "ab") as f:
        f.write(b'{"op_code":2,"wor')  # torn again, found by the next append this time
    with pytest.warns(JournalWarning, match=str(path)):
        writer.append_logs([op(3)])
    assert [x["user_attr"]["i"] for x in reader.read_logs(0)] == [0, 1, 3]


def test_a_corrupt_line_among_others_is_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "j.journal"
    AppendLog(path).append_logs([op(0)])
    with open(path, "ab") as f:
        f.write(b"\x00\x00garbage\n")
    AppendLog(path).append_logs([op(1)])
    with pytest.raises(JournalError, match=rf"{path}, line 2: not an Optuna journal operation"):
        AppendLog(path).read_logs(0)
    with pytest.raises(JournalError, match="line 2"):
        JournalStudies(path)


def test_a_short_write_is_undone(tmp_path, monkeypatch):
    from tunebench.tune import journal
    path = tmp_path / "j.journal"
    log = AppendLog(path)
    log.append_logs([op(0)])
    size = path.stat().st_size
    monkeypatch.setattr(journal.os, "write", lambda fd, data: os.pwrite(fd, data[:5], size))  # a disk that filled
    with pytest.raises(OSError, match="only 5 of"):
        log.append_logs([op(1)])
    monkeypatch.undo()
    assert path.stat().st_size == size
    log.append_logs([op(2)])
    assert [x["user_attr"]["i"] for x in AppendLog(path).read_logs(0)] == [0, 2]


APPENDER = """
import sys
from tunebench.tune.journal import AppendLog
log, me = AppendLog(sys.argv[1]), int(sys.argv[2])
for n in range(int(sys.argv[3])):
    # three operations per append, each longer than a page: one write() that the others must not split
    log.append_logs([{"op_code": 2, "worker_id": f"{me}", "user_attr": {"n": n, "k": k, "pad": "x" * 5000}}
                     for k in range(3)])
"""


def test_appends_of_several_processes_never_interleave(tmp_path):
    path, processes, appends = tmp_path / "j.journal", 4, 150
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-P", "-c", APPENDER, str(path), str(p), str(appends)], env=env)
             for p in range(processes)]
    assert [p.wait(120) for p in procs] == [0] * processes
    logs = AppendLog(path).read_logs(0)
    assert len(logs) == processes * appends * 3
    for i in range(0, len(logs), 3):  # each append's three lines side by side, in order
        batch = logs[i:i + 3]
        assert {x["worker_id"] for x in batch} == {batch[0]["worker_id"]}
        assert [(x["user_attr"]["n"], x["user_attr"]["k"]) for x in batch] == [(batch[0]["user_attr"]["n"], k)
                                                                                for k in range(3)]
    for p in range(processes):
        assert [x["user_attr"]["n"] for x in logs if x["worker_id"] == str(p)][::3] == list(range(appends))


def test_a_trial_whose_heartbeat_stopped_is_failed_and_retried_once(tmp_path):
    import optuna
    from optuna.trial import TrialState
    storage = JournalStudies(tmp_path / "s.journal", heartbeat_s=1, grace_s=60, stale_callback=retry_once)
    study = quiet_study(storage)
    stale, fresh, silent = study.ask(), study.ask(), study.ask()
    for trial in (stale, fresh, silent):
        trial.suggest_categorical("BLOCK", [16, 32])
    storage.record_heartbeat(fresh._trial_id)
    storage.set_trial_system_attr(stale._trial_id, "heartbeat", time.time() - 61)  # its process died a minute ago
    optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    # A trial that never had a heartbeat is not stale (SharedStudy.adopt_orphans gives it one), as on RDB storage.
    assert [states[t.number] for t in (stale, fresh, silent)] == [TrialState.FAIL, TrialState.RUNNING,
                                                                   TrialState.RUNNING]
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.system_attrs["retry_of"] == stale.number and retry.params == {"BLOCK": stale.params["BLOCK"]}
    study.tell(fresh, 1.0)
    beat = storage.get_trial(fresh._trial_id).system_attrs["heartbeat"]
    storage.record_heartbeat(fresh._trial_id)  # finished: no heartbeat is written, and nothing is raised
    assert storage.get_trial(fresh._trial_id).system_attrs["heartbeat"] == beat


def test_the_studies_go_in_a_journal_beside_an_sqlite_results_database(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's experimental heartbeat
        storage = open_storage(None, f"sqlite:///{tmp_path}/results.db")
    assert isinstance(storage, JournalStudies) and storage.path == str(tmp_path / "results.optuna.journal")
    assert storage.get_heartbeat_interval() == 30 and storage.get_heartbeat_stale_trial_callback() is retry_once
    explicit = open_storage(str(tmp_path / "elsewhere.journal"), f"sqlite:///{tmp_path}/results.db")
    assert explicit.path == str(tmp_path / "elsewhere.journal")


def test_a_run_started_before_the_journal_resumes_in_its_sqlite_file(tmp_path):
    import optuna
    legacy = tmp_path / "results.optuna.db"
    study = quiet_study(open_storage(f"sqlite:///{legacy}", "sqlite://"))
    study.tell(study.ask(), 1.0)
    resumed = open_storage(None, f"sqlite:///{tmp_path}/results.db")
    assert isinstance(resumed, optuna.storages.RDBStorage) and resumed.url == f"sqlite:///{legacy}"
    assert [t.value for t in quiet_study(resumed).trials] == [1.0]
    assert not (tmp_path / "results.optuna.journal").exists()
    (tmp_path / "results.optuna.journal").touch()  # once there is a journal, it is the one
    assert isinstance(open_storage(None, f"sqlite:///{tmp_path}/results.db"), JournalStudies)


def test_a_journal_in_a_folder_it_cannot_write_is_refused_before_anything_is_written(tmp_path):
    from tunebench.store import StoreError
    from tunebench.tune.options import TuneOptions
    with pytest.raises(ValueError, match="folder that does not exist"):
        TuneOptions(storage=str(tmp_path / "missing" / "s.journal")).validate()
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: every folder is writable")
        with pytest.raises(StoreError, match="Optuna journal"):
            check_storage(str(folder / "s.journal"), "sqlite://")
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []


# -- two `tunebench tune` processes on one journal, as several runs of one host share it


PROBLEM_LINE = 'Problem("flash_v1", 1, 2, 2, 48, 48, 16, "float32")'
LAUNCH = ("import sys; from tunebench import shapes; from tunebench.shapes import Problem; "
          f"shapes.SUITES['journal-test'] = lambda: [{PROBLEM_LINE}]; "
          "from tunebench.cli import main; sys.exit(main(sys.argv[1:]))")


def waiting_for_lock(pids: list[int]) -> int:
    """How many of the processes wait for a file lock (/proc/locks lists a waiter with '->')."""
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and int(line.split()[5]) in pids)


def start_together(journal, args: list[str], logs: list) -> list[subprocess.Popen]:
    """Starts a run per log while holding the journal's lock: they wait for it while opening it, and race for the
    study's first trials once it is let go."""
    import fcntl
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TUNEBENCH_GRACE_S": "3600"}
    with open(journal, "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        runs = [subprocess.Popen(args, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT) for log in logs]
        deadline = time.monotonic() + 120
        while waiting_for_lock([r.pid for r in runs]) < len(runs):
            assert all(r.poll() is None for r in runs), [log.read_text()[-2000:] for log in logs]
            assert time.monotonic() < deadline, "the runs never reached the journal"
            time.sleep(0.05)
    return runs


def tune_args(db, budget: int) -> list[str]:
    return [sys.executable, "-P", "-c", LAUNCH, "tune", "--interpret", "--suite", "journal-test", "--trials",
            str(budget), "--db", str(db)]


def evaluated(trials) -> list:
    return [t for t in trials if t.user_attrs.get("status") not in (None, "pruned") and "duplicate_of" not in
            t.user_attrs]


def check_shared(journal, db, budget: int) -> list:
    """Every trial finished, the budget met once over (no config twice), and one store row per evaluated trial."""
    from tunebench.registry import config_key
    from tunebench.store import Store
    storage = JournalStudies(journal)
    [study] = storage.get_all_studies()
    trials = storage.get_all_trials(study._study_id)
    done = evaluated(trials)
    assert not [t.number for t in trials if not t.state.is_finished()]
    assert len(done) == budget and len({config_key(t.params) for t in done}) == budget
    with Store(str(db), readonly=True) as store:
        rows = [t for t in store.trials() if t.status != "pruned"]
    assert sorted((t.number, config_key(t.config)) for t in rows) == sorted((t.number, config_key(t.params))
                                                                            for t in done)
    return trials


LOCKS = pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="reads the lock waiters from /proc/locks")


@LOCKS
def test_two_runs_on_one_journal_share_its_budget_and_run_no_config_twice(tmp_path):
    db, journal, budget = tmp_path / "results.db", tmp_path / "results.optuna.journal", 8
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    runs = start_together(journal, tune_args(db, budget), logs)
    assert [r.wait(300) for r in runs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    trials = check_shared(journal, db, budget)
    assert len({t.user_attrs["host"] for t in evaluated(trials)}) == 2, "one run ran every trial"


def held_trial(journal, pid: int) -> int | None:
    """A trial the process holds RUNNING with nothing but its "host" written, once it has finished one; None while
    any RUNNING trial has no "host" yet (an ask not yet tagged: a run killed then leaves a trial that is failed a
    heartbeat interval later, test_a_trial_left_without_its_host_...; this test is of a run killed mid-trial)."""
    storage = JournalStudies(journal)
    trials = [t for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)]
    if any(t.state.name == "RUNNING" and "host" not in t.user_attrs for t in trials):
        return None
    mine = [t for t in trials if t.user_attrs.get("host", "").endswith(f":{pid}")]
    if not any(t.state.is_finished() for t in mine):
        return None
    return next((t.number for t in mine if t.state.name == "RUNNING" and set(t.user_attrs) == {"host"}), None)


@LOCKS
def test_a_run_killed_mid_trial_is_taken_over_at_once_by_the_other(tmp_path):
    # The grace period is an hour: the survivor fails the victim's trial because its process is gone from this
    # host (SharedStudy.fail_dead_owners), retries it once, and completes the budget.
    import signal
    db, journal, budget = tmp_path / "results.db", tmp_path / "results.optuna.journal", 8
    logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
    victim, survivor = start_together(journal, tune_args(db, budget), logs)
    deadline = time.monotonic() + 300
    while True:
        assert victim.poll() is None, f"it ended before it could be killed:\n{logs[0].read_text()[-2000:]}"
        assert time.monotonic() < deadline, "the victim never held a trial"
        if held_trial(journal, victim.pid) is not None:
            os.kill(victim.pid, signal.SIGSTOP)  # it can write nothing more: the trial read now is the one left
            held = held_trial(journal, victim.pid)
            if held is not None:
                break
            os.kill(victim.pid, signal.SIGCONT)
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(30)
    assert survivor.wait(300) == 0, logs[1].read_text()[-2000:]
    trials = check_shared(journal, db, budget)
    lost = trials[held]
    assert lost.state.name == "FAIL" and "status" not in lost.user_attrs, (lost.state, lost.user_attrs)
    (retry,) = [t for t in trials if t.system_attrs.get("retry_of") == held]
    assert retry.params == (lost.system_attrs.get("fixed_params") or lost.params)  # the whole config, once


def test_a_trial_left_without_its_host_is_failed_a_heartbeat_later_and_retried(tmp_path):
    """A run killed between Optuna's ask and tagging the trial with its process leaves a RUNNING trial no one can
    name as a dead run's: only the grace period (an hour here) would fail it, and the other runs would wait for it.
    A heartbeat interval after it started it is failed and its config queued again; a trial another host holds,
    and one asked a moment ago, are left alone."""
    from optuna.trial import TrialState
    from tunebench.tune.shared import SharedStudy
    storage = JournalStudies(tmp_path / "s.journal", heartbeat_s=1, grace_s=3600, stale_callback=retry_once)
    study = quiet_study(storage)
    study.enqueue_trial({"BLOCK": 32})
    queued, orphan, elsewhere = study.ask(), study.ask(), study.ask()   # queued: killed before writing a parameter
    elsewhere.set_user_attr("host", "another-host:1")
    for trial in (orphan, elsewhere):
        trial.suggest_categorical("BLOCK", [16, 32])
    time.sleep(1.2)
    just_asked = study.ask()
    shared = SharedStudy.__new__(SharedStudy)                 # only what fail_dead_owners reads
    shared.study, shared.storage, shared.heartbeats, shared.open = study, storage, True, {}
    states = {t.number: t.state for t in shared.fail_dead_owners(study.get_trials(deepcopy=False))}
    assert [states[t.number] for t in (queued, orphan, elsewhere, just_asked)] == [
        TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
    retries = {t.system_attrs["retry_of"]: t.params for t in study.get_trials(states=(TrialState.WAITING,))}
    assert retries == {queued.number: {"BLOCK": 32}, orphan.number: orphan.params}


def test_a_journal_table_url_is_named_without_its_password():
    """`--storage journal:URL` (journal_sql): the run names its studies' place (describe_storage) with the password
    hidden, as for any database URL."""
    from tunebench.tune.study import hide_password
    assert hide_password("journal:postgresql+psycopg://tb:secret@db-host:5432/tb") == \
        "journal:postgresql+psycopg://tb:***@db-host:5432/tb"

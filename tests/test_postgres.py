"""Studies shared through a real PostgreSQL server, as hosts share them: separate `tunebench tune --interpret`
processes tune one study with one --storage and --db URL. Every trial is finished exactly once, the trial budget is
shared (not one per process), the winner passes keep and close_enough, and a process killed mid-run (SIGKILL) is
recovered from: its RUNNING trial goes stale, is failed by Optuna's heartbeat, and the others complete the study.

The server and a database per test: conftest.py's pg_server and pg_url fixtures."""
import dataclasses
import functools
import os
import pathlib
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest

from tunebench.registry import config_in_space, kernel_module
from tunebench.shapes import Problem, bucket_key
from tunebench.store import Store
from tunebench.tune.startup import interpreting
from tunebench.registry import config_key
from tunebench.tune.study import is_sql_journal, open_storage
from tunebench.inputs import Workload

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBLEM = Problem("flash_v1", 1, 2, 2, 48, 48, 16, "float32")
BUDGET = 8
HEARTBEAT_S, GRACE_S = 1, 8
# A `tunebench tune` process tuning PROBLEM alone: a suite of one problem is registered before the CLI parses. With
# $PG_TEST_HOSTNAME it names itself as a process of that host in the trials it holds, as one on another host would.
# With $PG_TEST_SLOW_S it waits that long after each verdict it records: a process whose workers start from a
# forkserver can run its whole share between two looks of a test that must catch it holding a trial.
LAUNCH = ("import os, sys, time; from tunebench import shapes; from tunebench.tune import shared; "
          f"shapes.SUITES['pg-test'] = lambda: [shapes.{PROBLEM!r}]; "
          "shared.HOST = os.environ.get('PG_TEST_HOSTNAME', shared.HOST.rpartition(':')[0]) + ':' + str(os.getpid()); "
          "slow, record = float(os.environ.get('PG_TEST_SLOW_S', 0)), shared.SharedStudy.record; "
          "shared.SharedStudy.record = lambda self, *a: (record(self, *a), time.sleep(slow))[0]; "
          "from tunebench.cli import main; sys.exit(main(sys.argv[1:]))")
RUN_TIMEOUT_S = 300


# -- processes as hosts


def start_host(url: str, log: pathlib.Path, hostname: str | None = None, slow_s: float = 0.0,
               storage: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "TUNEBENCH_HEARTBEAT_S": str(HEARTBEAT_S), "TUNEBENCH_GRACE_S": str(GRACE_S),
           "PYTHONUNBUFFERED": "1", "PG_TEST_SLOW_S": str(slow_s),
           **({"PG_TEST_HOSTNAME": hostname} if hostname else {})}
    args = [sys.executable, "-c", LAUNCH, "tune", "--interpret", "--suite", "pg-test", "--trials", str(BUDGET),
            "--storage", storage or url, "--db", url]
    with open(log, "w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def start_together(url: str, logs: list[pathlib.Path], storage: str) -> list[subprocess.Popen]:
    """Starts a process per log, holding Optuna's `studies` table (or the journal's table, for a `journal:URL`
    storage) locked until all of them wait for it: they then open the study at once, each with its workers up, and
    race for its first trials (each enqueues DEFAULT)."""
    import sqlalchemy
    from tunebench.tune.journal_sql import TABLE
    from tunebench.tune.study import close_storage
    close_storage(open_storage(storage, url))  # its tables, as the first process would create them
    table = TABLE if is_sql_journal(storage) else "studies"
    engine = sqlalchemy.create_engine(url)
    database = sqlalchemy.engine.make_url(url).database
    try:
        # Autocommit: within a transaction pg_stat_activity would show the same snapshot every time.
        with engine.connect() as lock, engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:
            held = lock.begin()
            lock.exec_driver_sql(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            hosts = [start_host(url, log, storage=storage) for log in logs]
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while watch.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %(db)s AND "
                                        "wait_event_type = 'Lock'", {"db": database}).scalar() < len(hosts):
                for host, log in zip(hosts, logs):
                    assert host.poll() is None, f"exit {host.returncode} before the start:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "the processes never reached their studies"
                time.sleep(0.2)
            held.commit()
    finally:
        engine.dispose()
    return hosts


def finish(hosts: list[subprocess.Popen], logs: list[pathlib.Path]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for host, log in zip(hosts, logs):
        try:
            host.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for h in hosts:
                h.kill()
            pytest.fail(f"a tunebench tune process did not finish in {RUN_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        assert host.returncode == 0, f"exit {host.returncode}:\n{log.read_text()[-3000:]}"


def the_study(url: str, storage: str | None = None):
    import optuna
    studies = open_storage(storage, url) if storage else url
    [summary] = optuna.get_all_study_summaries(studies)
    assert summary.user_attrs["bucket"] == bucket_key(PROBLEM), (summary.study_name, summary.user_attrs)
    return optuna.load_study(study_name=summary.study_name, storage=studies)


def evaluated(study) -> list:
    """Trials that ran a config to a verdict (neither pruned nor a stand-in for another trial)."""
    return [t for t in study.trials if t.user_attrs.get("status") not in (None, "pruned")
            and "duplicate_of" not in t.user_attrs]


def check_study_and_store(url: str, device: str, budget: int = BUDGET, storage: str | None = None) -> list:
    """Every trial finished exactly once, the budget shared, and the winner correct; returns the evaluated trials.
    ``storage``: where the studies are, if not in Optuna's tables of ``url`` (a `journal:URL`)."""
    from optuna.trial import TrialState
    study = the_study(url, storage)
    done = evaluated(study)
    # Nothing left running; a queued retry of a lost trial may be left only if its config has a verdict after all.
    left = [(t.number, t.state.name) for t in study.trials if not t.state.is_finished()
            and not (t.state == TrialState.WAITING and "retry_of" in t.system_attrs
                     and config_key(t.params) in {config_key(d.params) for d in done})]
    assert not left, f"trials left unfinished: {left}"
    assert len(done) == budget, "\n".join(f"{t.number} {t.state.name} {t.params} {t.user_attrs} {t.system_attrs}"
                                          for t in study.trials)
    assert len({config_key(t.params) for t in done}) == budget, "a config was evaluated twice"
    with Store(url, readonly=True) as store:
        stored = [t for t in store.trials(kernel=PROBLEM.kernel, problem=PROBLEM) if t.status != "pruned"]
        [winner] = store.winners(kernel=PROBLEM.kernel)
    by_number = {t.number: t for t in done}
    # One store record per evaluated trial, with the status Optuna was told; none for a trial that never ran.
    assert sorted(t.number for t in stored) == sorted(by_number), "store and study disagree on what ran"
    for t in stored:
        assert t.status == by_number[t.number].user_attrs["status"] and t.config == by_number[t.number].params
    assert all((t.state == TrialState.COMPLETE) == (t.user_attrs["status"] == "ok") for t in done)
    module = kernel_module(PROBLEM.kernel)
    oks = {config_key(t.params) for t in done if t.user_attrs["status"] == "ok"}
    assert config_key(winner.config) in oks
    with interpreting(True):
        assert module.keep(winner.config, PROBLEM) is None and config_in_space(PROBLEM.kernel, winner.config) is None
    assert Workload(PROBLEM, seed=1, device=device).check(module, winner.config).ok
    return done


# -- the tests


def test_results_and_studies_share_one_database(pg_url):
    import optuna
    import sqlalchemy
    from tunebench.device import DeviceIdentity
    from tunebench.store import TrialResult
    device = DeviceIdentity("NVIDIA H200", "9.0", 132, 150_000_000_000, "550", "2.13.0", "3.6.0", True)
    config = dict(kernel_module(PROBLEM.kernel).DEFAULT)
    with Store(pg_url) as store:
        storage = open_storage(pg_url, store.url)  # --db and --storage: the same URL
        study = optuna.create_study(storage=storage, study_name="shared")
        trial = study.ask()
        study.tell(trial, 1.0)
        store.record_trial(device, PROBLEM.kernel, "hash", PROBLEM, TrialResult(trial.number, config, "ok", 2.0))
        assert store.upsert_winner(device, PROBLEM.kernel, "hash", PROBLEM, config, 2.0, 1.0)
        assert not store.upsert_winner(device, PROBLEM.kernel, "hash", PROBLEM, config, 3.0, 1.0)  # slower: kept
        assert store.upsert_winner(device, PROBLEM.kernel, "hash", PROBLEM, config, 1.5, 1.0)
        assert store.upsert_winner(device, PROBLEM.kernel, "hash", PROBLEM, config, 1.75, 1.0, replace=True)
        assert store.set_speedup_vs_peer(device, PROBLEM.kernel, "hash", PROBLEM, config, 1.25)
    with Store(pg_url, readonly=True) as store:
        assert [t.median_ms for t in store.trials()] == [2.0]
        assert [(w.median_ms, w.speedup_vs_peer) for w in store.winners()] == [(1.75, 1.25)]
    assert [t.value for t in optuna.load_study(study_name="shared", storage=pg_url).trials] == [1.0]
    engine = sqlalchemy.create_engine(pg_url)
    with engine.connect() as connection:
        schemas = connection.exec_driver_sql(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'trials' ORDER BY 1").scalars()
        assert list(schemas) == ["public", "tunebench_results"]  # Optuna's and the store's, side by side
    engine.dispose()


def test_the_same_sqlite_file_for_results_and_studies_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/results.db"
    with pytest.raises(ValueError, match="same SQLite file"):
        open_storage(url, url)


def test_workers_of_one_process_share_its_study(pg_url, device):
    from tunebench.tune.options import TuneOptions
    from tunebench.tune.run import tune
    [result] = tune([PROBLEM], TuneOptions(interpret=True, workers=2, trials=6, storage=pg_url, db=pg_url,
                                           timeout=120.0))
    done = check_study_and_store(pg_url, device, budget=6)
    assert {t.user_attrs["runner"] for t in done} == {"run0", "run1"}  # both runners took trials
    assert result.config is not None and result.counts.get("ok") == 6


def test_processes_on_one_postgres_study_share_its_budget(pg_url, pg_storage, tmp_path, device):
    logs = [tmp_path / f"host{i}.log" for i in range(3)]
    hosts = start_together(pg_url, logs, pg_storage)
    finish(hosts, logs)
    done = check_study_and_store(pg_url, device, storage=pg_storage)
    default = kernel_module(PROBLEM.kernel).DEFAULT
    assert sum(t.params == default for t in done) == 1  # each process enqueued DEFAULT; the lowest trial ran it
    ran = {pid_of(t) for t in done}
    assert ran <= {p.pid for p in hosts}
    assert len(ran) >= 2, f"one process ran every trial: {ran}"


def test_a_process_killed_mid_run_is_recovered_from(pg_url, pg_storage, tmp_path, device):
    # The victim names another host, so its death can be learnt only from its heartbeat, as across machines.
    logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
    # The survivor starts once the victim is frozen holding a trial: started together, a survivor whose workers fork
    # from a forkserver could run the whole budget before the victim opened the study.
    victim = start_host(pg_url, logs[0], hostname="elsewhere", slow_s=0.5, storage=pg_storage)
    held, frozen_at = freeze_holding_a_trial(pg_url, victim, logs[0], pg_storage)
    survivor = start_host(pg_url, logs[1], storage=pg_storage)
    workers = child_pids(victim.pid)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(30)
    finish([survivor], logs[1:])
    done = check_study_and_store(pg_url, device, storage=pg_storage)
    stale = the_study(pg_url, pg_storage).trials[held]
    # No status, nor the "abandoned" message a run that could still act leaves: failed for it, by its heartbeat,
    # which stopped at the freeze and was found stale a grace period later.
    assert stale.state.name == "FAIL" and "status" not in stale.user_attrs and "message" not in stale.user_attrs, \
        f"trial {held} of the killed process: {stale.state.name} {stale.user_attrs}"
    assert (stale.datetime_complete - frozen_at).total_seconds() >= GRACE_S - HEARTBEAT_S - 1
    assert survivor.pid in {pid_of(t) for t in done}
    assert_exited(workers)


def pid_of(trial) -> int:
    return int(trial.user_attrs["host"].rsplit(":", 1)[1])


def freeze_holding_a_trial(url: str, process: subprocess.Popen, log: pathlib.Path,
                           storage: str) -> tuple[int, datetime]:
    """Stops the process (SIGSTOP) once it has finished a trial and holds another RUNNING, and returns that trial's
    number and when it was stopped. The trials are read again after the stop: a stopped process can tell Optuna
    nothing more (its workers' replies wait in their pipes), so the trial read RUNNING then is RUNNING when it is
    killed, however soon the process would have finished or pruned it. If it holds none by then, it runs on."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"it ended before it could be killed:\n{log.read_text()[-3000:]}"
        if held_trials(url, process.pid, storage):
            os.kill(process.pid, signal.SIGSTOP)
            frozen_at = datetime.now()  # naive local time, as Optuna stamps trials
            held = held_trials(url, process.pid, storage)
            if held:
                return held[0], frozen_at
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.2)
    pytest.fail(f"no trial was ever running:\n{log.read_text()[-3000:]}")


def held_trials(url: str, pid: int, storage: str) -> list[int]:
    """The trials the process holds RUNNING with no verdict written yet, once it has also finished one (so it is
    mid-run). Not one whose attributes it has begun to write: Optuna commits each on its own, so a process stopped
    between them leaves a trial RUNNING with, say, its status but no state."""
    import optuna
    from optuna.trial import TrialState
    journal = is_sql_journal(storage)   # its table is made on first use; Optuna's tables are looked for first
    studies = optuna.get_all_study_summaries(_storage(url, storage)) if journal or _has_studies(url) else []
    if not studies:
        return []
    trials = optuna.load_study(study_name=studies[0].study_name, storage=_storage(url, storage)).trials
    mine = [t for t in trials if "host" in t.user_attrs and pid_of(t) == pid]
    if not any(t.state.is_finished() for t in mine):
        return []
    return [t.number for t in mine if t.state == TrialState.RUNNING and set(t.user_attrs) == {"host"}]


@functools.lru_cache(maxsize=None)
def _storage(url: str, storage: str):
    """One storage per database, made once its tables exist: a fresh one per look (an engine, a schema check) made
    each look take long enough on a loaded 2-core machine for the victim to finish its share between two looks.
    ``storage``: the --storage (a `journal:URL` has its table made here if the victim has not yet)."""
    import optuna
    return open_storage(storage, url) if is_sql_journal(storage) else optuna.storages.RDBStorage(url)


def _has_studies(url: str) -> bool:
    import sqlalchemy
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return bool(connection.exec_driver_sql("SELECT to_regclass('public.trial_heartbeats') IS NOT NULL "
                                                   "AND EXISTS (SELECT 1 FROM public.studies)").scalar())
    except sqlalchemy.exc.ProgrammingError:
        return False  # the tables are not there yet
    finally:
        engine.dispose()


def child_pids(parent: int) -> list[int]:
    pids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def assert_exited(pids: list[int], within_s: float = 20.0) -> None:
    """The killed process's workers exit by themselves (they watch their parent) rather than hold a GPU."""
    deadline = time.monotonic() + within_s
    alive = [p for p in pids if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if running(p)]
    assert not alive, f"workers of the killed process still running: {alive}"


def running(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its parent (killed) will not reap it


def test_a_version_1_schema_is_migrated_in_place_and_refused_read_only(pg_url):
    """Schema 1 -> 3 on PostgreSQL: the problems table gains its page and kv_dtype columns and a unique key with them
    (issue 19)."""
    import sqlalchemy
    from tunebench.shapes import Problem
    from tunebench.store import SCHEMA_VERSION, StoreError
    from tunebench.store.engine import PG_SCHEMA
    from test_store import H100
    dense = Problem("flash_v2", 2, 8, 2, 64, 64, 32, "float16", True)
    paged = Problem("paged_attention", 2, 8, 2, 1, 64, 32, "float16", page=16)
    config = {"BLOCK_N": 16, "PARTITION": 0, "num_warps": 2, "num_stages": 1}
    with Store(pg_url) as store:
        store.upsert_winner(H100, "flash_v2", "h", dense, {"BLOCK_M": 16}, 0.5, 1.2)  # store never checks SPACE
        store.upsert_winner(H100, "paged_attention", "h", paged, config, 0.5, 1.2)
    engine = sqlalchemy.create_engine(pg_url)
    with engine.begin() as c:                 # back to schema 1: no page or kv_dtype column, the unique key without
        c.exec_driver_sql(f"SET search_path TO {PG_SCHEMA}")
        c.exec_driver_sql("ALTER TABLE problems DROP COLUMN page, DROP COLUMN kv_dtype")
        c.exec_driver_sql('ALTER TABLE problems ADD UNIQUE (kernel, "B", "Hq", "Hkv", "Nq", "Nk", "D", dtype, causal)')
        c.exec_driver_sql("UPDATE schema_version SET version = 1")
    with pytest.raises(StoreError, match="schema version 1; open it writable once"):
        Store(pg_url, readonly=True)
    with Store(pg_url) as store:
        assert [w.problem for w in store.winners()] == [dense]
        for page in (16, 32):
            assert store.upsert_winner(H100, "paged_attention", "h2", dataclasses.replace(paged, page=page),
                                       config, 0.25, 1.0)
        assert sorted(w.problem.page for w in store.winners(kernel="paged_attention")) == [16, 32]
    with engine.begin() as c:
        assert c.exec_driver_sql(f"SELECT version FROM {PG_SCHEMA}.schema_version").scalar() == SCHEMA_VERSION
    engine.dispose()


def _append_batches(url: str, writer: int, batches: int) -> None:
    from tunebench.tune.journal_sql import SqlLog
    log = SqlLog(url)
    for i in range(batches):
        log.append_logs([{"op_code": 0, "writer": writer, "batch": i, "part": part} for part in range(3)])


def test_the_journal_table_gives_every_reader_one_order_of_concurrent_appends(pg_url):
    """journal_sql.SqlLog: 4 processes append 3-operation batches at once. Every batch's operations are adjacent and
    in order, each writer's batches in its own order, none lost or doubled; a read from a number gives the rest."""
    import multiprocessing
    from tunebench.tune.journal_sql import SqlLog
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_append_batches, args=(pg_url, w, 40)) for w in range(4)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    logs = SqlLog(pg_url).read_logs(0)
    assert len(logs) == 4 * 40 * 3
    batches = [logs[i:i + 3] for i in range(0, len(logs), 3)]
    assert all([op["part"] for op in b] == [0, 1, 2] and len({(op["writer"], op["batch"]) for op in b}) == 1
               for b in batches)
    for w in range(4):
        assert [b[0]["batch"] for b in batches if b[0]["writer"] == w] == list(range(40))
    assert SqlLog(pg_url).read_logs(len(logs) - 5) == logs[-5:]


@pytest.mark.parametrize("edit", ["DELETE FROM {table} WHERE seq = 1", "UPDATE {table} SET op = 'x' WHERE seq = 1"],
                         ids=["a row deleted", "a row not an operation"])
def test_an_edited_journal_table_is_an_error_naming_the_row(pg_url, edit):
    """journal_sql.SqlLog: a gap in the numbers or a row that is not an operation is never replayed past."""
    import sqlalchemy
    from tunebench.tune.journal import JournalError
    from tunebench.tune.journal_sql import TABLE, SqlLog
    log = SqlLog(pg_url)
    log.append_logs([{"op_code": 0, "n": n} for n in range(3)])
    engine = sqlalchemy.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(edit.format(table=TABLE))
    engine.dispose()
    with pytest.raises(JournalError, match=rf"{TABLE}(: operation 1 is missing|, row 1: not an Optuna journal)"):
        log.read_logs(0)
    assert SqlLog(pg_url).read_logs(2) == [{"op_code": 0, "n": 2}]

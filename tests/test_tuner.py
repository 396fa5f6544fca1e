"""`tunebench tune` end to end on the CPU (--interpret): real spawned workers, the real results store and Optuna
studies in SQLite files under tmp_path. Planted faults come from test-only kernel modules (tests/fake_kernels)
registered into the kernel registry for the test."""
import dataclasses
import io
import json
import os
import pathlib
import statistics
import sys

import pytest

TESTS = pathlib.Path(__file__).parent
sys.path.insert(0, str(TESTS))  # fake_kernels, here and (through spawn's copy of sys.path) in the workers

from conftest import HAS_GPU  # noqa: E402
from fake_kernels import launched, launching_processes  # noqa: E402
from tunebench import registry  # noqa: E402
from tunebench.cli import main  # noqa: E402
from tunebench.registry import config_in_space, kernel_identity, kernel_module  # noqa: E402
from tunebench.shapes import Problem, bucket_key, suite  # noqa: E402
from tunebench.store import Store  # noqa: E402
from tunebench.commands.problems import select_problems  # noqa: E402
from tunebench.tune.options import TuneOptions  # noqa: E402
from tunebench.tune.run import tune  # noqa: E402
from tunebench.tune.startup import interpreting  # noqa: E402
from tunebench.registry import config_key  # noqa: E402
from tunebench.tune.study import all_configs, open_storage  # noqa: E402
from tunebench.inputs import workload_for  # noqa: E402

FAKES = {"fake_behaviours": "fake_kernels.behaviours", "fake_faulty": "fake_kernels.faulty",
         "fake_plain": "fake_kernels.plain", "fake_lagging": "fake_kernels.lagging"}


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    for name, path in FAKES.items():
        monkeypatch.setitem(registry.KERNELS, name, path)
    log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("TUNEBENCH_FAKE_LOG", str(log))
    return log


def fake_problem(kernel: str) -> Problem:
    return Problem(kernel, 1, 2, 1, 24, 40, 16, "float32", causal=True)


def options(tmp_path, **kw) -> TuneOptions:
    return TuneOptions(**{"interpret": True, "db": str(tmp_path / "results.db"), "timeout": 60.0, **kw})


def statuses(store: Store, kernel: str) -> dict[tuple, str]:
    return {config_key(t.config): t.status for t in store.trials(kernel=kernel)}


@pytest.mark.skipif(HAS_GPU, reason="checks the message given on a machine without a GPU")
def test_without_gpu_or_interpret_it_says_what_to_do(tmp_path, capsys):
    db = tmp_path / "results.db"
    assert main(["tune", "--suite", "tiny", "--db", str(db)]) != 0
    err = capsys.readouterr().err
    assert "--interpret" in err and "GPU" in err
    assert not db.exists()


@pytest.mark.interpreter
def test_tune_store_lookup_end_to_end(tmp_path, capsys, device):
    from tunebench.runtime.dispatch import Dispatcher, Winners
    db = tmp_path / "results.db"
    # A compile worker too: the scheduling the GPU path uses (under the interpreter its warmup launches nothing).
    assert main(["tune", "--interpret", "--suite", "tiny", "--trials", "2", "--compile-workers", "1",
                 "--db", str(db)]) == 0
    assert "vs DEFAULT" in capsys.readouterr().out
    problems = suite("tiny")
    with Store(str(db), readonly=True) as store:
        winners = {bucket_key(w.problem): w for w in store.winners(device_name="cpu-interpreter")}
        assert set(winners) == {bucket_key(p) for p in problems}
        lookup = Winners.load("cpu-interpreter", [store.url])
        for problem in problems:
            w, module = winners[bucket_key(problem)], kernel_module(problem.kernel)
            assert module.keep(w.config, problem) is None and config_in_space(problem.kernel, w.config) is None
            assert workload_for(problem, module, seed=1, device=device).check(module, w.config).ok
            assert w.speedup_vs_default is not None and w.speedup_vs_default >= 1.0
            assert Dispatcher(lookup).choose(problem).config == w.config
            counts = store.trial_counts(kernel=problem.kernel, problem=problem)
            assert counts.get("ok", 0) >= 2, counts


def test_every_status_and_pruned_configs_never_launch(tmp_path, fakes):
    # With a compile worker: under the interpreter it runs the fake launch path, so the log shows what it was given.
    problem = fake_problem("fake_behaviours")
    [result] = tune([problem], options(tmp_path, sampler="grid", compile_workers=1))
    module = kernel_module("fake_behaviours")
    with Store(result_db(tmp_path)) as store:
        got = statuses(store, "fake_behaviours")
        pruned = [t for t in store.trials(kernel="fake_behaviours") if t.status == "pruned"]
    expected_status = {"ok": "ok", "wrong": "incorrect", "unwritten": "incorrect", "mutate": "incorrect",
                       "compile_error": "compile_error", "out_of_resources": "out_of_resources"}
    for mode, status in expected_status.items():
        for x in (1, 2):
            assert got[config_key({"MODE": mode, "X": x})] == status, (mode, x)
    assert len(pruned) == 6 and all("pretend shared-memory limit" in t.message for t in pruned)
    assert all(module.keep(c, problem) is None for c in launched(fakes))
    assert {c["X"] for c in launched(fakes)} == {1, 2}
    assert len(launching_processes(fakes)) == 2  # the runner and the compile worker
    assert result.config["MODE"] == "ok" and result.speedup is not None
    assert result.counts == {"ok": 2, "incorrect": 6, "compile_error": 2, "out_of_resources": 2, "pruned": 6}


def test_a_crashing_and_a_hanging_trial_do_not_stop_the_study(tmp_path, fakes):
    # seed 0 orders the grid: DEFAULT (ok), then hang, crash, and the other ok config after both faults.
    [result] = tune([fake_problem("fake_faulty")], options(tmp_path, sampler="grid", seed=0, timeout=5.0))
    with Store(result_db(tmp_path)) as store:
        trials = [t for t in store.trials(kernel="fake_faulty") if t.status != "pruned"]
    by_mode = {t.config["MODE"]: t for t in trials if t.config["MODE"] != "ok"}
    assert by_mode["crash"].status == "crashed" and "exit code 7" in by_mode["crash"].message
    assert by_mode["hang"].status == "timeout"
    oks = [t for t in trials if t.status == "ok"]
    assert len(oks) == 2
    assert max(t.number for t in oks) > max(by_mode["crash"].number, by_mode["hang"].number)
    assert result.config in ({"MODE": "ok", "X": 1}, {"MODE": "ok", "X": 2}) and result.written


def test_tuning_leaves_triton_interpret_as_it_was(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "x")
    with interpreting(False):
        assert os.environ["TRITON_INTERPRET"] == "0"  # what keep() must see when the workers compile for a GPU
    assert os.environ["TRITON_INTERPRET"] == "x"
    monkeypatch.delenv("TRITON_INTERPRET")
    with interpreting(True):
        assert os.environ["TRITON_INTERPRET"] == "1"
    assert "TRITON_INTERPRET" not in os.environ


def test_a_stopped_run_resumes_without_rerunning_finished_trials(tmp_path, fakes):
    problem = fake_problem("fake_plain")
    tune([problem], options(tmp_path, trials=3))
    with Store(result_db(tmp_path)) as store:
        first = {t.number: t for t in store.trials(kernel="fake_plain")}
    assert len(first) == 3
    tune([problem], options(tmp_path, trials=6))
    with Store(result_db(tmp_path)) as store:
        after = {t.number: t for t in store.trials(kernel="fake_plain")}
    assert len(after) == 6 and len({config_key(t.config) for t in after.values()}) == 6
    for number, t in first.items():
        assert after[number].started_at == t.started_at and after[number].config == t.config


def result_db(tmp_path) -> str:
    return str(tmp_path / "results.db")


def test_problem_selection():
    assert select_problems(None, None, None, interpret=True) == suite("tiny")
    assert {p.kernel for p in select_problems(["flash_v1"], None, None, interpret=True)} == {"flash_v1"}
    default = select_problems(None, None, None, interpret=False)
    assert len({bucket_key(p) for p in default}) == len(default) > 0
    # bf16 is garbage under the interpreter: presets are tuned in fp16 there
    preset = select_problems(["paged_attention"], None, "llama-3-8b", interpret=True)
    assert preset and all(p.kernel == "paged_attention" and p.dtype == "float16" for p in preset)
    with pytest.raises(ValueError, match="give one of --suite, --preset and --from-record"):
        select_problems(None, "tiny", "llama-3-8b", interpret=True)


def test_studies_live_beside_an_sqlite_results_database(tmp_path):
    import optuna
    storage = open_storage(None, f"sqlite:///{tmp_path}/results.db")
    assert storage.path == f"{tmp_path}/results.optuna.journal"  # an Optuna journal (tests/test_journal.py)
    assert isinstance(open_storage(None, "sqlite://"), optuna.storages.InMemoryStorage)
    with pytest.raises(ValueError, match="--storage"):
        open_storage(None, "postgresql+psycopg://u@localhost/tunebench")


def test_storage_may_name_a_journal_file(tmp_path, fakes):
    from tunebench.tune.journal import JournalStudies
    journal = tmp_path / "studies" / "elsewhere.journal"
    journal.parent.mkdir()
    [result] = tune([fake_problem("fake_plain")], options(tmp_path, trials=2, storage=str(journal)))
    assert result.config is not None and result.counts.get("ok") == 2
    storage = JournalStudies(journal)
    [study] = storage.get_all_studies()
    assert sum(t.user_attrs.get("status") == "ok" for t in storage.get_all_trials(study._study_id)) == 2
    assert not (tmp_path / "results.optuna.journal").exists()  # not beside --db as well


def test_a_queued_trial_killed_while_writing_its_config_is_retried_whole():
    # A run killed between the parameters of a queued (grid) trial: the retry carries the whole queued config.
    import optuna
    from optuna.trial import TrialState

    from tunebench.tune.study import retry_once
    study = optuna.create_study()
    done = study.ask()
    done.suggest_categorical("BLOCK_M", [16, 32])
    done.suggest_categorical("BLOCK_N", [16, 32])
    study.tell(done, 1.0)
    study.enqueue_trial({"BLOCK_M": 32, "BLOCK_N": 16})
    half = study.ask()
    half.suggest_categorical("BLOCK_M", [16, 32])  # killed here, before BLOCK_N
    study.tell(half, state=TrialState.FAIL)
    retry_once(study, study.trials[half.number])
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.params == {"BLOCK_M": 32, "BLOCK_N": 16}
    assert retry.system_attrs["retry_of"] == half.number
    again = study.ask()  # the tuner's suggestions take the queued values without a distribution clash
    assert {n: again.suggest_categorical(n, [16, 32]) for n in ("BLOCK_M", "BLOCK_N")} == retry.params


def test_a_finished_problem_is_re_timed_while_the_next_one_searches(tmp_path, fakes, monkeypatch):
    # One runner: the first problem's re-timing is in the background when the second problem's search starts, so
    # the second problem's first trial waits for it; both winners still arrive, in the order of the problems.
    from tunebench.tune import trace
    log = tmp_path / "trace.jsonl"
    monkeypatch.setattr(trace, "_path", str(log))
    monkeypatch.setattr(trace, "_file", None)
    problems = [fake_problem("fake_plain"), Problem("fake_plain", 1, 2, 1, 24, 24, 16, "float32", causal=False)]
    results = tune(problems, options(tmp_path, trials=2))
    trace._file.close()
    assert [r.problem for r in results] == problems and all(r.config is not None and r.written for r in results)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    second = next(e["t"] for e in events if e["kind"] == "problem" and e["index"] == 1)
    first_confirmed = next(e["t"] for e in events if e["kind"] == "confirmed" and e["index"] == 0)
    assert second < first_confirmed
    retimes = [e for e in events if e["kind"] == "send" and e["request"] == "Retime"]
    assert len(retimes) == 2


def lagging_problems() -> list[Problem]:
    return [fake_problem("fake_lagging"), Problem("fake_lagging", 1, 2, 1, 24, 24, 16, "float32", causal=False)]


def traced_tune(tmp_path, monkeypatch, problems, **kw) -> tuple[list, list[dict]]:
    from tunebench.tune import trace
    log = tmp_path / "trace.jsonl"
    monkeypatch.setattr(trace, "_path", str(log))
    monkeypatch.setattr(trace, "_file", None)
    results = tune(problems, options(tmp_path, **kw))
    trace._file.close()
    return results, [json.loads(line) for line in log.read_text().splitlines()]


def check_lagging_results(tmp_path, problems, results) -> dict[int, list]:
    """Every config of both problems evaluated once and told ok; the winners are fast configs. Returns each study's
    trials from the store (0: the first problem's)."""
    from optuna.trial import TrialState
    assert [r.problem for r in results] == problems
    assert all(r.config is not None and r.config["X"] != 3 and r.written and not r.note for r in results)
    storage = open_storage(None, f"sqlite:///{result_db(tmp_path)}")
    for study in storage.get_all_studies():
        trials = storage.get_all_trials(study._study_id)
        assert sorted(t.params["X"] for t in trials) == [1, 2, 3]
        assert all(t.state == TrialState.COMPLETE and t.user_attrs["status"] == "ok" for t in trials)
    with Store(result_db(tmp_path)) as store:
        return {i: store.trials(kernel="fake_lagging", problem=p) for i, p in enumerate(problems)}


def test_the_next_problem_starts_while_the_last_trial_of_one_runs(tmp_path, fakes, monkeypatch, capsys):
    # Two runners: once the first problem has nothing left to ask and only running trials (the slow DEFAULT among
    # them), the second problem starts, and the runners go on to it; the slow trial's result is still told, and
    # the first problem's re-timing follows it.
    problems = lagging_problems()
    results, events = traced_tune(tmp_path, monkeypatch, problems, trials=3, workers=2, sampler="grid")
    [searched] = [e for e in events if e["kind"] == "searched" and e["index"] == 0]
    assert searched["running"] >= 1
    second = next(i for i, e in enumerate(events) if e["kind"] == "problem" and e["index"] == 1)
    first_retime = next(i for i, e in enumerate(events) if e["kind"] == "send" and e["request"] == "Retime")
    assert second < first_retime  # the second problem began before the first one's trials had all finished
    check_lagging_results(tmp_path, problems, results)
    assert "of [1/2] ok" in capsys.readouterr().err  # the late trial's line names its problem


def test_a_handed_off_problems_last_configs_run_before_the_next_ones(tmp_path, fakes, monkeypatch):
    # One runner and two compile workers: while the slow DEFAULT runs, the first problem's other configs are compiled
    # and the compile workers are idle, so the second problem starts and its configs compile; the runner still takes
    # every config of the first problem before any of the second's.
    problems = lagging_problems()
    results, events = traced_tune(tmp_path, monkeypatch, problems, trials=3, sampler="grid", compile_workers=2)
    [searched] = [e for e in events if e["kind"] == "searched" and e["index"] == 0]
    # One runs; the other two wait, one of them sent to the runner to start after it (Worker.enqueue).
    assert searched["running"] == 1 and searched["queued"] + searched["pending"] == 2
    trials = check_lagging_results(tmp_path, problems, results)
    assert max(t.started_at for t in trials[0]) < min(t.started_at for t in trials[1])
    begun = next(e["t"] for e in events if e["kind"] == "problem" and e["index"] == 1)
    compiled = [e["t"] for e in events if e["kind"] == "send" and e["request"] == "Compile" and e["t"] > begun]
    last_of_first = max(t.finished_at for t in trials[0]).timestamp()
    assert compiled and compiled[0] < last_of_first  # the second problem compiled while the first one ran


def test_finalists_whose_rounds_overlap_get_more_rounds(tmp_path, fakes, monkeypatch):
    # The first rounds leave two finalists overlapping: those two, and only they, are re-timed for the extra rounds,
    # on one runner, and the winner comes from all their rounds.
    from tunebench.text import format_config
    from tunebench.tune import confirm, timing
    monkeypatch.setattr(confirm, "EXTRA_ROUNDS_INTERPRET", 2)
    monkeypatch.setattr(timing, "contenders", lambda rounds: [0, len(rounds) - 1])
    [result], events = traced_tune(tmp_path, monkeypatch, [fake_problem("fake_plain")], trials=4)
    first, extra = [e for e in events if e["kind"] == "retimed"]
    assert len(first["configs"]) >= 3 and all(len(r) == 2 for r in first["rounds_ms"])
    assert extra["extra"] and extra["configs"] == [first["configs"][0], first["configs"][-1]]
    assert [len(r) for r in extra["rounds_ms"]] == [4, 4]
    assert sum(1 for e in events if e["kind"] == "send" and e["request"] == "Retime") == 2
    assert result.config is not None and result.written and not result.note
    rounds = dict(zip(first["configs"], first["rounds_ms"]))
    rounds.update(zip(extra["configs"], extra["rounds_ms"]))  # the contenders' rounds, first and extra
    assert result.median_ms == min(timing.confirmed_ms(r) for r in rounds.values())
    assert result.median_ms == timing.confirmed_ms(rounds[format_config(result.config)])


def test_a_replacing_kernel_is_retimed_beside_the_replaced_kernels_winner(tmp_path, fakes, monkeypatch):
    # As flash_v3 beside flash_v2: the twin's finalists and fake_plain's stored winner for the same bucket are timed
    # in the same rounds, and the winner carries its speedup over it (what variant="auto" goes by).
    monkeypatch.setitem(registry.KERNELS, "fake_twin", FAKES["fake_plain"])
    monkeypatch.setitem(registry.REPLACES, "fake_twin", "fake_plain")
    problems = [fake_problem("fake_plain"), fake_problem("fake_twin")]
    (plain, twin), events = traced_tune(tmp_path, monkeypatch, problems, trials=3)
    assert plain.speedup_vs_peer is None and plain.written
    first = [e for e in events if e["kind"] == "retimed" and e["index"] == 1][0]
    assert len(first["rounds_ms"]) == len(first["configs"]) + 1  # the peer's rounds come last
    peer_ms = statistics.median(first["rounds_ms"][-1])
    assert twin.speedup_vs_peer == pytest.approx(peer_ms / twin.median_ms)
    assert "fake_plain (its winner" in twin.note, twin.note
    [stored] = Store(str(tmp_path / "results.db")).winners(kernel="fake_twin")
    assert stored.speedup_vs_peer == pytest.approx(twin.speedup_vs_peer)


def test_a_stored_winner_that_keeps_its_place_gets_its_speedup_over_the_peer_measured_anew(tmp_path, fakes,
                                                                                            monkeypatch):
    # A faster earlier winner stays (the store never takes a slower time), but the head-to-head figure that
    # variant="auto" goes by is the new run's: the stored config is re-timed beside the peer even where the new run's
    # finalists do not hold it.
    import sqlite3
    monkeypatch.setitem(registry.KERNELS, "fake_twin", FAKES["fake_plain"])
    monkeypatch.setitem(registry.REPLACES, "fake_twin", "fake_plain")
    db = tmp_path / "results.db"
    tune([fake_problem("fake_twin")], options(tmp_path, trials=2))
    with sqlite3.connect(db) as c:     # an earlier, luckier time, with a head-to-head figure auto must not keep
        c.execute("update winners set median_ms = 1e-6, speedup_vs_peer = 99.0")
    (tmp_path / "results.optuna.journal").unlink()          # a fresh study: its finalists are new trials
    [again] = tune([fake_problem("fake_twin")], options(tmp_path, trials=2, seed=7))
    [stored] = Store(str(db)).winners(kernel="fake_twin")
    assert not again.written and stored.median_ms == 1e-6
    assert stored.speedup_vs_peer is not None and stored.speedup_vs_peer != 99.0
    assert "its speedup over fake_plain is now" in again.note, again.note


def test_tune_replace_stores_the_new_runs_winner_over_a_faster_stored_one(tmp_path, fakes):
    import sqlite3
    db = tmp_path / "results.db"
    tune([fake_problem("fake_plain")], options(tmp_path, trials=2))
    with sqlite3.connect(db) as c:     # a lucky earlier time that a plain re-tune cannot beat
        c.execute("update winners set median_ms = 1e-6")
    [kept] = tune([fake_problem("fake_plain")], options(tmp_path, trials=2))
    assert not kept.written and Store(str(db)).winners()[0].median_ms == 1e-6
    [replaced] = tune([fake_problem("fake_plain")], options(tmp_path, trials=2, replace=True))
    [stored] = Store(str(db)).winners()
    assert replaced.written and stored.median_ms == pytest.approx(replaced.median_ms) and stored.median_ms > 1e-6


@pytest.mark.parametrize("fault", ["wrong", "mutate", "compile_error"])
def test_a_replaced_kernels_config_that_fails_a_trials_checks_is_not_timed_as_the_peer(tmp_path, fakes, monkeypatch,
                                                                                       fault):
    # Wrong output, writing into its inputs, or not launching: the peer goes through a trial's checks, and failing
    # one it is left out of the re-timing, which still picks and stores the winner (no head-to-head figure).
    monkeypatch.setitem(registry.KERNELS, "fake_twin", FAKES["fake_plain"])
    monkeypatch.setitem(registry.REPLACES, "fake_twin", "fake_behaviours")
    monkeypatch.setattr(kernel_module("fake_behaviours"), "DEFAULT", {"MODE": fault, "X": 2})
    [twin] = tune([fake_problem("fake_twin")], options(tmp_path, trials=2))
    assert twin.written and twin.speedup_vs_peer is None and "re-timing failed" not in twin.note, twin.note
    assert "fake_behaviours (DEFAULT) was not timed beside it" in twin.note, twin.note
    [stored] = Store(str(tmp_path / "results.db")).winners(kernel="fake_twin")
    assert stored.speedup_vs_peer is None


def test_a_repeat_is_marked_a_duplicate_before_it_is_given_a_status():
    # Optuna commits each user attribute on its own: a run killed between the two writes of a repeat must leave a
    # trial with duplicate_of and no status, never a status alone (which reads as one more evaluated config).
    from types import SimpleNamespace
    from tunebench.tune.shared import Seen, SharedStudy
    written = []
    SharedStudy.tell_repeat(SimpleNamespace(tell=lambda trial, attrs, *a, **kw: written.append(list(attrs))), None,
                       Seen({"BLOCK_M": 16}, "ok", 3, 1.0))
    assert written == [["duplicate_of", "status"]]


def test_problems_whose_timings_cost_most_are_tuned_first():
    # Paged decode is timed by graph replay (~0.25 s a timing, against ~0.1 s): those problems go first, so the last
    # problem's re-timing, which nothing overlaps, is a short one. Otherwise the given order stands.
    from tunebench.tune.run import schedule
    problems = suite("default")
    order = schedule(problems)
    paged = [p for p in problems if p.paged]
    assert paged and len(paged) < len(problems)
    assert order == paged + [p for p in problems if not p.paged]


def test_results_come_in_the_given_order_whatever_order_the_problems_are_tuned_in(tmp_path, fakes, monkeypatch):
    from tunebench.tune import run, trace
    log = tmp_path / "trace.jsonl"
    monkeypatch.setattr(trace, "_path", str(log))
    monkeypatch.setattr(trace, "_file", None)
    monkeypatch.setattr(run, "schedule", lambda problems: problems[::-1])
    problems = [fake_problem("fake_plain"), Problem("fake_plain", 1, 2, 1, 24, 24, 16, "float32", causal=False)]
    results = tune(problems, options(tmp_path, trials=2))
    trace._file.close()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["label"] for e in events if e["kind"] == "problem"] == [p.label() for p in problems[::-1]]
    assert [r.problem for r in results] == problems and all(r.config is not None for r in results)


def test_a_failed_re_timing_falls_back_to_the_trial_medians(tmp_path, fakes, monkeypatch):
    # The finalists' re-timing fails in the worker (its module cannot be imported there): the winner is the
    # fastest by its trial median, and the result says why.
    from tunebench.tune import confirm, protocol
    monkeypatch.setattr(confirm, "Retime", lambda module, *a, **kw: protocol.Retime("no_such_module_here", *a, **kw))
    [result] = tune([fake_problem("fake_plain")], options(tmp_path, trials=3))
    with Store(result_db(tmp_path)) as store:
        fastest = min((t for t in store.trials(kernel="fake_plain") if t.status == "ok"), key=lambda t: t.median_ms)
    assert "re-timing failed (error" in result.note and "trial medians used" in result.note
    assert result.config == fastest.config and result.median_ms == fastest.median_ms


def test_the_grid_is_queued_a_lookahead_at_a_time(tmp_path, fakes, monkeypatch):
    # Every ask reads Optuna's whole queue: the grid goes into it a few configs at a time, and is still exhaustive.
    import optuna
    from optuna.trial import TrialState
    waiting = []
    real = optuna.Study.enqueue_trial

    def enqueue(study, params, *a, **kw):
        waiting.append(len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))))
        return real(study, params, *a, **kw)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", enqueue)
    [result] = tune([fake_problem("fake_behaviours")], options(tmp_path, sampler="grid", compile_workers=1))
    assert len(waiting) == 18 and max(waiting) < 2  # lookahead: 1 runner + 1 compile worker
    assert sum(result.counts.values()) == 18


def test_background_replies_go_to_their_handler():
    from tunebench.tune.pool import Fleet
    from tunebench.tune.protocol import Identify
    with Fleet(TuneOptions(interpret=True, workers=2)) as fleet:
        got = []
        fleet.submit_background(fleet.runners[0], Identify(), 60.0, got.append)
        fleet.runners[1].submit(Identify(), 60.0)
        events = []
        while not (got and events):
            events += fleet.wait(timeout=5.0)
        assert [w for w, _ in events] == [fleet.runners[1]] and events[0][1].kind == "ok"
        assert len(got) == 1 and got[0].kind == "ok" and not fleet.background
        processes = [w.process for w in fleet.workers]
    assert all(not p.is_alive() for p in processes)


def test_the_re_timing_rounds_are_shared_by_the_idle_runners(tmp_path, fakes, monkeypatch):
    # Two runners, one problem: nothing else to overlap its re-timing, so each runner times the finalists in one of
    # the (interpreter's two) rounds; the winner comes from both rounds.
    from tunebench.tune import trace
    log = tmp_path / "trace.jsonl"
    monkeypatch.setattr(trace, "_path", str(log))
    monkeypatch.setattr(trace, "_file", None)
    [result] = tune([fake_problem("fake_plain")], options(tmp_path, trials=3, workers=2))
    trace._file.close()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    retimed_by = sorted(e["worker"] for e in events if e["kind"] == "send" and e["request"] == "Retime")
    assert retimed_by == ["run0", "run1"]
    assert result.config is not None and result.written and not result.note


def test_a_re_timing_that_the_next_search_overlaps_goes_to_one_runner(tmp_path, fakes, monkeypatch):
    # Two runners, two problems: the first problem's rounds go to one runner (the other starts the next search),
    # the last problem's are shared by the runners idle then (both, unless the first re-timing is still going on).
    from tunebench.tune import trace
    log = tmp_path / "trace.jsonl"
    monkeypatch.setattr(trace, "_path", str(log))
    monkeypatch.setattr(trace, "_file", None)
    problems = [fake_problem("fake_plain"), Problem("fake_plain", 1, 2, 1, 24, 24, 16, "float32", causal=False)]
    results = tune(problems, options(tmp_path, trials=3, workers=2))
    trace._file.close()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    second = next(i for i, e in enumerate(events) if e["kind"] == "searched" and e["index"] == 1)
    retimes = [(i, e["worker"]) for i, e in enumerate(events) if e["kind"] == "send" and e["request"] == "Retime"]
    [(sent, first)] = [(i, w) for i, w in retimes if i < second]
    # The last problem's rounds go to every runner idle then: both, unless the first re-timing is still going on.
    first_done = next(i for i, e in enumerate(events) if i > sent and e["kind"] == "done" and e["worker"] == first)
    idle = {"run0", "run1"} if first_done < second else {"run0", "run1"} - {first}
    assert sorted(w for i, w in retimes if i > second) == sorted(idle)
    assert all(r.config is not None and r.written and not r.note for r in results)


@pytest.mark.interpreter
def test_tpe_times_the_neighbouring_winners_of_the_family_so_transfer_has_evidence(tmp_path, device):
    from tunebench.device import DeviceIdentity
    from tunebench.tune.enqueue import neighbour_winners
    module = kernel_module("flash_v2")
    near, far, target = (Problem("flash_v2", 1, 2, 1, n, n, 32, "float16", causal=True) for n in (64, 512, 128))
    other_family = Problem("flash_v2", 1, 2, 1, 128, 128, 32, "float16", causal=False)
    admitted = [c for c in all_configs(module.SPACE) if c != module.DEFAULT and module.keep(c, target) is None]
    x, y, z = admitted[0], admitted[1], admitted[2]
    device, identity = DeviceIdentity.current(interpret=True), kernel_identity("flash_v2")
    with Store(str(tmp_path / "results.db")) as store:
        store.upsert_winner(device, "flash_v2", identity, near, x, 1.0, 1.1)
        store.upsert_winner(device, "flash_v2", identity, far, y, 1.0, 1.1)
        store.upsert_winner(device, "flash_v2", identity, other_family, z, 1.0, 1.1)     # another family
        store.upsert_winner(device, "flash_v2", "stale", Problem("flash_v2", 1, 2, 1, 256, 256, 32, "float16",
                                                                   causal=True), z, 1.0, 1.1)
        assert neighbour_winners(store, device.name, target, identity, module.DEFAULT) == [x, y]
    tune([target], options(tmp_path, trials=3, compile_workers=0))
    with Store(str(tmp_path / "results.db"), readonly=True) as store:
        timed = [t.config for t in store.trials(kernel="flash_v2", problem=target)]
    assert timed[:3] == [module.DEFAULT, x, y]


def test_exchange_configs_are_the_neighbours_winners_not_yet_evaluated_that_keep_admits(tmp_path):
    from tunebench.device import DeviceIdentity
    from tunebench.store.models import TrialResult
    from tunebench.tune.enqueue import exchange_configs
    module = kernel_module("flash_v2")
    target = Problem("flash_v2", 1, 2, 1, 128, 128, 32, "float16", causal=True)
    near = [Problem("flash_v2", 1, 2, 1, n, n, 32, "float16", causal=True) for n in (64, 256, 512)]
    admitted = [c for c in all_configs(module.SPACE) if c != module.DEFAULT and module.keep(c, target) is None]
    tried, vetoed, fresh = admitted[:3]
    device, identity = DeviceIdentity.current(interpret=True), kernel_identity("flash_v2")
    with Store(str(tmp_path / "results.db")) as store:
        for problem, config in zip(near, (tried, vetoed, fresh)):
            store.upsert_winner(device, "flash_v2", identity, problem, config, 1.0, 1.1)
        store.record_trial(device, "flash_v2", identity, target, TrialResult(0, tried, "ok", 1.0))
        keep = lambda c: "vetoed" if c == vetoed else None  # noqa: E731
        assert exchange_configs(store, device, target, identity, module.DEFAULT, keep) == [fresh]

        def raising(config):
            raise RuntimeError("a bug in keep")
        assert exchange_configs(store, device, target, identity, module.DEFAULT, raising) == []


@pytest.mark.interpreter
@pytest.mark.parametrize("exchange", [True, False])
def test_the_exchange_pass_times_a_neighbours_later_winner(tmp_path, exchange):
    """A bucket tuned before its neighbour found a new winner times that winner in the exchange pass (here the
    neighbour's winner is stored between two runs: the second run's main pass has nothing left to do), and its one
    result covers both passes."""
    from tunebench.device import DeviceIdentity
    module = kernel_module("flash_v2")
    target = Problem("flash_v2", 1, 2, 1, 128, 128, 32, "float16", causal=True)
    neighbour = Problem("flash_v2", 1, 2, 1, 256, 256, 32, "float16", causal=True)
    tune([target], options(tmp_path, trials=2, compile_workers=0))
    with Store(str(tmp_path / "results.db")) as store:
        first = [t.config for t in store.trials(kernel="flash_v2", problem=target)]
        later = next(c for c in all_configs(module.SPACE)
                     if c not in first and module.keep(c, target) is None and module.keep(c, neighbour) is None)
        device = DeviceIdentity.current(interpret=True)
        store.upsert_winner(device, "flash_v2", kernel_identity("flash_v2"), neighbour, later, 1.0, 1.1)
    log = io.StringIO()
    results = tune([target], options(tmp_path, trials=2, compile_workers=0, exchange=exchange), err=log)
    with Store(str(tmp_path / "results.db"), readonly=True) as store:
        timed = [t.config for t in store.trials(kernel="flash_v2", problem=target) if t.status != "pruned"]
    assert len(results) == 1 and results[0].problem is target
    if exchange:
        assert timed == first + [later] and results[0].counts.get("ok") == 3
        assert "exchange: 1 of 1 problems" in log.getvalue() and "[exchange 1/1] " in log.getvalue()
    else:
        assert timed == first and "[exchange" not in log.getvalue() and "exchange:" not in log.getvalue()


@pytest.mark.interpreter
def test_a_new_study_adds_to_the_buckets_trial_record_rather_than_overwrite_it(tmp_path):
    """The store keys a bucket's trials by number, and every new study numbers from 0: a second run into the same
    database with another --storage (or with the journal lost, or a results.db copied to another machine) once
    replaced the first run's records with its own. Its trials now follow them."""
    problem = Problem("flash_v2", 1, 2, 1, 128, 128, 32, "float16", causal=True)
    tune([problem], options(tmp_path, trials=2, compile_workers=0, storage=str(tmp_path / "a.journal")))
    with Store(str(tmp_path / "results.db"), readonly=True) as store:
        first = [(t.number, config_key(t.config), t.status) for t in store.trials(kernel="flash_v2", problem=problem)]
    assert len([f for f in first if f[2] != "pruned"]) == 2
    tune([problem], options(tmp_path, trials=2, compile_workers=0, storage=str(tmp_path / "b.journal"), seed=1,
                            exchange=False))
    with Store(str(tmp_path / "results.db"), readonly=True) as store:
        both = [(t.number, config_key(t.config), t.status) for t in store.trials(kernel="flash_v2", problem=problem)]
    assert both[:len(first)] == first
    later = both[len(first):]
    assert len([t for t in later if t[2] != "pruned"]) == 2
    assert [n for n, _, _ in later] == list(range(first[-1][0] + 1, first[-1][0] + 1 + len(later)))


def test_tune_kernel_flash_v3_tunes_the_flash_v2_problems_it_can_run(monkeypatch):
    """flash_v3 has no problems of its own in the suites: named, it takes the flash_v2 ones its keep() admits (as on
    a Hopper GPU, pretended here), so that variant="auto" has both kernels' winners per bucket to compare."""
    import tunebench.registry as registry
    module = pytest.importorskip("tunebench.kernels.flash_v3")
    monkeypatch.setattr(module, "unavailable", lambda: None)
    monkeypatch.setattr(registry, "KERNELS", dict(registry.KERNELS))
    monkeypatch.setattr(registry, "UNAVAILABLE", {})
    v2 = [p for p in suite("headline") if p.kernel == "flash_v2"]
    got = select_problems(["flash_v3"], "headline", None)
    assert got and {p.kernel for p in got} == {"flash_v3"}
    assert [dataclasses.replace(p, kernel="flash_v2") for p in got] == [p for p in v2 if p.D in (64, 128, 256)]
    both = select_problems(["flash_v2", "flash_v3"], "headline", None)
    assert {p.kernel for p in both} == {"flash_v2", "flash_v3"} and len(both) == len(v2) + len(got)
    # With no --kernel, tune takes every kernel that runs here: on Hopper each prefill bucket for flash_v3 too.
    everything = select_problems(None, "headline", None)
    assert [p for p in everything if p.kernel == "flash_v3"] == got
    assert {p.kernel for p in everything} == {"flash_v1", "flash_v2", "flash_v3", "paged_attention"}


def test_tune_with_no_kernel_named_takes_no_flash_v3_problems_where_it_cannot_run(monkeypatch):
    import tunebench.registry as registry
    module = pytest.importorskip("tunebench.kernels.flash_v3")
    monkeypatch.setattr(module, "unavailable", lambda: "not Hopper (pretended)")
    monkeypatch.setattr(registry, "KERNELS", {k: v for k, v in registry.KERNELS.items() if k != "flash_v3"})
    monkeypatch.setattr(registry, "UNAVAILABLE", {})
    got = select_problems(None, "headline", None)
    assert "flash_v3" not in {p.kernel for p in got} and "flash_v2" in {p.kernel for p in got}


@pytest.mark.parametrize("sampler", ["tpe", "grid"])
def test_a_reseeded_sampler_proposes_what_a_new_one_per_trial_does(sampler, monkeypatch):
    # study.reseed reuses one sampler (its search-space cache, no per-trial construction): the configs it proposes
    # must be those of a new sampler made for each trial, which is what the seeding promises.
    import optuna
    from optuna.trial import TrialState
    from tunebench.tune import study as study_module
    from tunebench.tune.study import make_sampler, quiet_optuna, suggest_config
    quiet_optuna()
    space = kernel_module("flash_v2").SPACE

    def proposals() -> list[dict]:
        study = optuna.create_study(sampler=make_sampler(TuneOptions(sampler=sampler, seed=3), 24))
        out = []
        for n in range(30):
            trial = study.ask()
            config = suggest_config(trial, space)
            out.append(config)
            if n % 5 == 4:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, sum(len(str(v)) * i for i, v in enumerate(config.values())))
        return out

    reseeded = proposals()
    monkeypatch.setattr(study_module, "reseed", lambda sampler, seed: False)  # a new sampler per trial
    assert reseeded == proposals()
    assert len({config_key(c) for c in reseeded}) > 10


def test_the_random_start_is_a_uniform_draw_by_seed_among_admitted_configs():
    # TPE's random start, queued (enqueue.random_start): only configs keep() admits, each once, in an order that
    # --seed decides, every admitted config as likely first as any other.
    import collections
    from tunebench.tune.enqueue import random_start
    module = kernel_module("flash_v2")
    problem = Problem("flash_v2", 1, 2, 1, 64, 64, 32, "float16", causal=True)
    reasons = {config_key(c): module.keep(c, problem) for c in all_configs(module.SPACE)}
    admitted = {key for key, reason in reasons.items() if reason is None}
    assert 0 < len(admitted) < len(reasons)
    draws = {seed: [config_key(c) for c in random_start(module.SPACE, module.DEFAULT, reasons, seed)]
             for seed in range(400)}
    assert all(sorted(d) == sorted(admitted) for d in draws.values())
    assert draws[0] != draws[1] and draws[0] == [config_key(c) for c in
                                                 random_start(module.SPACE, module.DEFAULT, reasons, 0)]
    firsts = collections.Counter(d[0] for d in draws.values())
    assert len(firsts) > len(admitted) // 2 and max(firsts.values()) < 400 * 4 / len(admitted)


def test_an_avoiding_tpe_proposes_no_config_it_refuses_while_its_samples_hold_others():
    # study.Avoid: TPE picks, of the configs it samples, the best one not refused (here: evaluated, or keep()
    # rejects it); TPE alone repeats configs and proposes rejected ones.
    import optuna
    from tunebench.tune.study import Avoid, make_sampler, quiet_optuna, suggest_config, tpe_startup
    quiet_optuna()
    module = kernel_module("flash_v2")
    problem = Problem("flash_v2", 1, 2, 1, 64, 64, 32, "float16", causal=True)

    def wasted(avoid: bool) -> int:
        seen: set = set()
        refuses = Avoid(module.SPACE, lambda c: config_key(c) in seen or module.keep(c, problem) is not None)
        study = optuna.create_study(sampler=make_sampler(TuneOptions(seed=3), 24, avoid=refuses if avoid else None))
        waste = 0
        for n in range(30):
            trial = study.ask()
            config = suggest_config(trial, module.SPACE)
            waste += n >= tpe_startup(24) and refuses.refuses(config)   # after TPE's own random start
            seen.add(config_key(config))
            study.tell(trial, sum(len(str(v)) * i for i, v in enumerate(config.values())))
        return waste

    assert wasted(avoid=False) > 5
    assert wasted(avoid=True) == 0



def test_a_config_queued_behind_a_hang_or_a_crash_runs_in_the_fresh_process(tmp_path, fakes, monkeypatch):
    # One runner: each config is sent to wait behind the one running (Worker.enqueue), so the crash waits behind
    # the hang, and the second ok config behind the crash. Each replacement process is sent the waiting config
    # again, set up anew, and every config gets the verdict of its own run. (A problem is followed by another here:
    # the run's last problem queues nothing, Search.queue_runs.)
    problems = [fake_problem("fake_faulty"), fake_problem("fake_plain")]
    [result, _], events = traced_tune(tmp_path, monkeypatch, problems, sampler="grid", seed=0, timeout=5.0)
    steps = [(e["kind"], e.get("request") or e.get("result"), bool(e.get("queued"))) for e in events
             if e.get("worker") == "run0" and e["kind"] in ("send", "done")]
    assert ("send", "Run", True) in steps
    for fault in ("timeout", "died"):
        i = steps.index(("done", fault, False))
        assert steps[i + 1:i + 3] == [("send", "Setup", False), ("send", "Run", False)], steps
    with Store(result_db(tmp_path)) as store:
        trials = [t for t in store.trials(kernel="fake_faulty") if t.status != "pruned"]
    assert sorted((t.config["MODE"], t.config["X"], t.status) for t in trials) == [
        ("crash", 1, "crashed"), ("hang", 1, "timeout"), ("ok", 1, "ok"), ("ok", 2, "ok")]
    assert result.written and result.config["MODE"] == "ok"

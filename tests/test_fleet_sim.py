"""How many GPUs one parent loop keeps busy (issue 22): the real tuner loop, Optuna storage and results store, on a
fleet of simulated workers that sleep 20 ms per trial (tunebench.tune.simulate). CPU only: the figures say what the
parent's own work costs, nothing about a GPU."""
import json
import warnings

import pytest

from tunebench.registry import config_key
from tunebench.shapes import suite
from tunebench.store import Store
from tunebench.tune.options import TuneOptions
from tunebench.tune.simulate import DEVICE_NAME, Simulation, simulate
from tunebench.tune.study import open_storage

WORKERS = 8
TRIAL_S = 0.02
BUSY_GOAL = 0.90
# Measured on a 2-core CPU (bench/fleet_sim.py, simulated, Optuna's studies in the journal file): the parent spends
# ~4.4-5 ms of CPU per trial run, ~2.4 Optuna proposals of ~1.2 ms each (TPE's sampling about half of one; the rest
# are configs keep() rejects, or repeats) and ~1 ms of writes, which caps it at ~125-190 trials/s (it was ~25 with
# Optuna's SQLite storage: 5-8% busy).
MEASURED = "8 simulated workers were 37-52% busy (125-187 trials/s)"
BUSY_FLOOR = 0.10   # well under what was measured (a slower CI machine), over the 5-8% of the SQLite storage


def problems():
    """Two problems: the second's search starts while the first's last trials and re-timing finish (hand-off)."""
    return [p for p in suite("default") if p.kernel == "flash_v2"][:2]


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    options = TuneOptions(interpret=True, db=str(tmp / "results.db"), workers=WORKERS, trials=24)
    results, use = simulate(problems(), options, Simulation((TRIAL_S,)), tmp / "trace.jsonl")
    return options, results, use


def test_no_trial_is_lost_or_run_twice(fleet_run):
    from optuna.trial import TrialState
    options, results, use = fleet_run
    assert use.duplicates == 0, use.runs
    assert [r.problem for r in results] == problems() and all(r.written for r in results)
    with Store(options.db) as store:
        rows = {p.label(): store.trials(device=DEVICE_NAME, problem=p) for p in problems()}
    for label, trials in rows.items():
        evaluated = [t for t in trials if t.status != "pruned"]
        # Every config the workers ran is in the store once, as ok; the budget was met, not overrun.
        assert all(t.status == "ok" for t in evaluated)
        assert sorted(config_key(t.config) for t in evaluated) == sorted(
            config_key(json.loads(c)) for p, c in use.runs if p == label)
        assert len({config_key(t.config) for t in evaluated}) == len(evaluated) == options.trials
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's experimental heartbeat
        storage = open_storage(None, f"sqlite:///{options.db}")
    studies = storage.get_all_studies()
    assert len(studies) == 2
    for study in studies:
        trials = storage.get_all_trials(study._study_id)
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        told = [t for t in trials if t.user_attrs.get("status") == "ok" and "duplicate_of" not in t.user_attrs]
        assert len(told) == options.trials and all(t.state == TrialState.COMPLETE for t in told)


def test_the_runners_are_kept_above_the_floor(fleet_run):
    _, _, use = fleet_run
    assert set(use.busy) == {f"run{i}" for i in range(WORKERS)}
    assert use.mean_busy >= BUSY_FLOOR, use.busy
    assert use.asks > 0 and use.ask_s > 0


@pytest.mark.xfail(strict=True, reason=f"issue 22 goal not met yet: {MEASURED} (the parent's CPU per trial run, "
                                       f"mostly Optuna's TPE proposals, is the limit)")
def test_eight_workers_are_kept_90_percent_busy(fleet_run):
    _, _, use = fleet_run
    assert use.mean_busy >= BUSY_GOAL, f"{use.mean_busy:.1%} busy: {use.busy}"

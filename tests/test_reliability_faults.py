"""Every kind of planted fault in one study (tests/fake_kernels/every_fault.py), through `tune` with real spawned
workers, and its outcome table: each fault gets its status, a worker that died, hung or met a CUDA fault is replaced
and the trials after it complete, no trial is lost, the parent process never initialises CUDA, and no fault wins.

tests/test_tuner.py checks each status on its own search spaces (and that pruned configs never launch); this test is
the consolidated figure the README quotes. The GPU variant launches a real out-of-bounds Triton store."""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

TESTS = pathlib.Path(__file__).parent
sys.path.insert(0, str(TESTS))  # fake_kernels, here and (through spawn's copy of sys.path) in the workers

from fake_kernels import admitted_grid_order, every_fault  # noqa: E402
from tunebench import registry  # noqa: E402
from tunebench.shapes import Problem  # noqa: E402
from tunebench.store import Store  # noqa: E402
from tunebench.tune.options import TuneOptions  # noqa: E402
from tunebench.tune.run import tune  # noqa: E402
from tunebench.registry import config_key  # noqa: E402
from tunebench.tune.study import open_storage, study_name  # noqa: E402

EXPECTED = {"ok": "ok", "out_of_resources": "out_of_resources", "compile_error": "compile_error",
            "hang": "timeout", "illegal_access": "crashed", "wrong": "incorrect", "unwritten": "incorrect",
            "mutate": "incorrect", "crash": "crashed"}
FATAL = {"hang", "illegal_access", "crash"}   # the worker is killed or exits: a fresh process takes the next trial
PROBLEM = Problem("fake_every_fault", 1, 2, 1, 24, 40, 16, "float32", causal=True)
GPU_PROBLEM = Problem("fake_gpu_fault", 1, 2, 1, 24, 40, 16, "float32", causal=True)




def log_entries(path) -> list[dict]:
    """What fake_kernels.log_launch wrote: each launch's config and process id, in order."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def seed_ending_on_ok(module) -> int:
    """A grid seed whose last config is correct, so even the last fault has a trial after it."""
    return next(s for s in range(100) if admitted_grid_order(module, s, PROBLEM)[-1]["MODE"] == "ok")


@pytest.fixture
def every_fault_kernel(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.KERNELS, PROBLEM.kernel, "fake_kernels.every_fault")
    log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("TUNEBENCH_FAKE_LOG", str(log))
    return log


def test_every_fault_in_one_study(tmp_path, every_fault_kernel):
    cuda_before = torch.cuda.is_initialized()
    seed = seed_ending_on_ok(every_fault)
    db = tmp_path / "results.db"
    start = time.monotonic()
    [result] = tune([PROBLEM], TuneOptions(interpret=True, sampler="grid", seed=seed, db=str(db), timeout=5.0))
    wall = time.monotonic() - start
    if not cuda_before:
        assert not torch.cuda.is_initialized()  # the parent never touches a CUDA context (on a GPU machine too)

    with Store(str(db), readonly=True) as store:
        trials = store.trials(kernel=PROBLEM.kernel)
        (winner,) = store.winners()
    evaluated = [t for t in trials if t.status != "pruned"]
    table = {t.config["MODE"]: t.status for t in evaluated if t.config["MODE"] != "ok"}
    print(f"faults injected: {len(every_fault.FAULTS)} kinds, {wall:.0f} s wall; "
          + ", ".join(f"{mode} -> {status}" for mode, status in table.items()))
    assert table == {mode: EXPECTED[mode] for mode in every_fault.FAULTS}
    assert [t.status for t in evaluated if t.config["MODE"] == "ok"] == ["ok"] * 3
    assert "illegal memory access" in next(t.message for t in evaluated if t.config["MODE"] == "illegal_access")

    # No trial lost: every trial Optuna handed out is finished, and each has its one row in the store.
    import optuna
    name = study_name(result_device(), PROBLEM.kernel, registry.kernel_identity(PROBLEM.kernel), PROBLEM)
    study = optuna.load_study(study_name=name, storage=open_storage(None, f"sqlite:///{db}"))
    optuna_trials = study.get_trials(deepcopy=False)
    assert {t.state.name for t in optuna_trials} <= {"COMPLETE", "FAIL", "PRUNED"}
    assert sorted(t.number for t in optuna_trials) == sorted(t.number for t in trials)
    assert len(evaluated) == len(admitted_grid_order(every_fault, seed, PROBLEM))
    assert len({config_key(t.config) for t in trials}) == len(trials)  # nothing ran twice

    # Each trial ran in the order planned; after a fatal fault the next trial runs in a fresh process, after any
    # other in the same one, and it completes.
    runs = trial_runs(log_entries(every_fault_kernel))[:len(evaluated)]
    assert [e["config"] for e in runs] == [t.config for t in sorted(evaluated, key=lambda t: t.number)]
    for before, after in zip(runs, runs[1:]):
        fatal = before["config"]["MODE"] in FATAL
        assert (after["pid"] != before["pid"]) == fatal, (before, after)
    assert len({e["pid"] for e in log_entries(every_fault_kernel)}) == 1 + len(FATAL)

    # Nothing a fault produced can win: every fault is failed in Optuna (no value), and the winner is correct.
    faults = [t for t in optuna_trials if t.params.get("MODE") != "ok" and t.user_attrs.get("status") != "pruned"]
    assert len(faults) == len(every_fault.FAULTS) and all(t.value is None for t in faults)
    assert study.best_trial.params["MODE"] == "ok"
    assert result.config["MODE"] == "ok" and winner.config["MODE"] == "ok"


def result_device():
    from tunebench.device import DeviceIdentity
    return DeviceIdentity.current(interpret=True)


def trial_runs(entries: list[dict]) -> list[dict]:
    """One entry per trial: a trial launches its config once to check it, then again to time it, in one process."""
    return [e for i, e in enumerate(entries) if i == 0 or e != entries[i - 1]]


# -- on a GPU: a real illegal memory access


GPU_SCRIPT = """
import json, sys
import torch
from tunebench import registry
from tunebench.shapes import Problem
from tunebench.tune.options import TuneOptions
from tunebench.tune.run import tune
registry.KERNELS["fake_gpu_fault"] = "fake_kernels.gpu_fault"
problem = Problem("fake_gpu_fault", 1, 2, 1, 24, 40, 16, "float32", causal=True)
[r] = tune([problem], TuneOptions(sampler="grid", seed=int(sys.argv[2]), db=sys.argv[1], timeout=60.0))
print(json.dumps({"cuda_initialized": torch.cuda.is_initialized(), "config": r.config}))
"""


@pytest.mark.gpu
def test_an_illegal_memory_access_on_a_gpu_is_crashed_and_the_worker_replaced(tmp_path):
    from fake_kernels import gpu_fault
    seed = next(s for s in range(100)
                if [c["MODE"] for c in admitted_grid_order(gpu_fault, s, GPU_PROBLEM)] == ["ok", "oob", "ok"])
    db, log = tmp_path / "results.db", tmp_path / "launches.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               TUNEBENCH_FAKE_LOG=str(log))
    # A fresh parent process: pytest's own may have initialised CUDA in earlier tests.
    done = subprocess.run([sys.executable, "-c", GPU_SCRIPT, str(db), str(seed)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert reply["cuda_initialized"] is False
    assert reply["config"]["MODE"] == "ok"
    with Store(str(db), readonly=True) as store:
        trials = sorted(store.trials(kernel="fake_gpu_fault"), key=lambda t: t.number)
    assert [(t.config["MODE"], t.status) for t in trials if t.status != "pruned"] == \
           [("ok", "ok"), ("oob", "crashed"), ("ok", "ok")], [(t.config, t.status, t.message) for t in trials]
    oob = next(t for t in trials if t.config["MODE"] == "oob")
    assert any(marker in oob.message for marker in ("illegal memory access", "unspecified launch failure",
                                                     "misaligned address", "CUDA error")), oob.message
    runs = trial_runs(log_entries(log))
    # The faulting process never launches again: every run after the fault is in a fresh CUDA context. (On the H100
    # the run log's order differed from the grid's, so the fault is looked up rather than assumed at index 1.)
    i = next(i for i, r in enumerate(runs) if r["config"]["MODE"] == "oob")
    assert runs[i + 1:] and all(r["pid"] != runs[i]["pid"] for r in runs[i + 1:]), runs


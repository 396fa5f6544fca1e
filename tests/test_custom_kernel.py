"""Bring your own kernel: a module that follows tunebench.kernel_protocol is tuned, checked, stored and dispatched with
no change to tunebench. The RMSNorm example (examples/custom_kernel) is installed from its own package (pip
--target into a temporary folder put on sys.path, offline) and registered by its entry point; a torch softmax with a
planted bug (tests/fake_kernels/domain.py) is registered with --kernel-module."""
import json
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

TESTS = pathlib.Path(__file__).parent
sys.path.insert(0, str(TESTS))  # fake_kernels, here and (through spawn's copy of sys.path) in the workers

from conftest import HAS_GPU  # noqa: E402
from tunebench import registry  # noqa: E402
from tunebench.cli import main  # noqa: E402
from tunebench.correctness import close_enough  # noqa: E402
from tunebench.shapes import Problem, bucket_key  # noqa: E402
from tunebench.store import Store  # noqa: E402

EXAMPLE = TESTS.parent / "examples" / "custom_kernel"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example package installed as a user would (its entry point included), into a folder of its own."""
    work = tmp_path_factory.mktemp("rmsnorm")
    source, target = work / "src", work / "site"
    shutil.copytree(EXAMPLE, source)                       # the build writes into its source tree: not into ours
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    return target


@pytest.fixture
def registered(installed, monkeypatch):
    """The example on sys.path, and a registry that reads entry points afresh and forgets them after the test."""
    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.setattr(registry, "KERNELS", dict(registry.KERNELS))
    monkeypatch.setattr(registry, "_state", {"entry_points_read": False, "checked": set()})
    monkeypatch.setenv("TUNEBENCH_HOME", str(installed.parent / "home"))


def test_the_entry_point_registers_the_example_and_its_module_follows_the_convention(registered):
    assert registry.known_kernels()["rmsnorm"] == "tunebench_rmsnorm.kernel"
    module = registry.kernel_module("rmsnorm")
    assert registry.declared_problems(["rmsnorm"], "tiny") == [
        Problem("rmsnorm", 2, 1, 1, 33, 33, 48, "float32"), Problem("rmsnorm", 1, 1, 1, 64, 64, 64, "float16")]
    assert module.keep(module.DEFAULT, Problem("rmsnorm", 1, 1, 1, 1, 1, 65536, "float32")) is None
    assert len(registry.kernel_identity("rmsnorm")) == 16


@pytest.mark.parametrize("on_gpu", [
    pytest.param(False, marks=[pytest.mark.interpreter, pytest.mark.skipif(HAS_GPU, reason="the GPU case runs")]),
    pytest.param(True, marks=pytest.mark.gpu)], ids=["interpret", "gpu"])
def test_the_example_is_tuned_stored_and_dispatched(registered, tmp_path, monkeypatch, capsys, device, on_gpu):
    import tunebench
    from tunebench.runtime import dispatch
    db = tmp_path / "results.db"
    how = ["--suite", "tiny", "--trials", "6"] if on_gpu else ["--interpret", "--trials", "3"]
    assert main(["tune", "--kernel", "rmsnorm", *how, "--db", str(db)]) == 0, capsys.readouterr().err
    module = registry.kernel_module("rmsnorm")
    problems = registry.declared_problems(["rmsnorm"], "tiny")
    with Store(str(db), readonly=True) as store:
        winners = {bucket_key(w.problem): w for w in store.winners(kernel="rmsnorm")}
        trials = store.trials(kernel="rmsnorm")
    assert set(winners) == {bucket_key(p) for p in problems}
    assert all(t.status in ("ok", "pruned") for t in trials) and sum(t.status == "ok" for t in trials) >= 4
    assert all(t.throughput > 0 for t in trials if t.status == "ok")      # the module's own throughput hook

    monkeypatch.setenv("TUNEBENCH_DB", str(db))
    dispatch.reload()
    from tunebench_rmsnorm import rms_norm
    for problem in problems:
        w = winners[bucket_key(problem)]
        assert tunebench.tuned_config(problem) == w.config and module.keep(w.config, problem) is None
        assert dispatch._DISPATCHER.choose(problem).why.startswith("exact winner")
        (x, weight), kwargs, _ = module.make_inputs(problem, device, seed=7)
        refs = [module.reference(x, weight, dtype=d, **kwargs) for d in (torch.float64, x.dtype)]
        assert close_enough(rms_norm(x, weight, **kwargs), *refs).ok
    dispatch.reload()


@pytest.mark.interpreter
def test_the_example_passes_the_gate(registered, capsys):
    assert main(["check", "--kernel", "rmsnorm", "--profile", "cpu", "--examples", "2"]) == 0
    [row] = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("rmsnorm")]
    assert row[1] == "2" and row[-1] == "0"                  # two examples, no failure


def test_a_kernel_module_flag_registers_a_kernel_and_the_gate_catches_its_bug(monkeypatch, capsys):
    monkeypatch.setattr(registry, "KERNELS", dict(registry.KERNELS))
    assert main(["check", "--kernel-module", "softmax=fake_kernels.domain", "--kernel", "softmax",
                 "--profile", "cpu", "--examples", "20"]) == 1
    out = capsys.readouterr().out
    assert "FAIL softmax: max error" in out
    repro = out.split("reproduce: ")[1].strip()
    assert '"MODE": "wrong"' in repro and "--kernel-module softmax=fake_kernels.domain" in repro
    monkeypatch.setattr(registry, "KERNELS", {k: registry.KERNELS[k] for k in registry.BUILT_IN})  # a new process's
    assert main(shlex.split(repro)[1:]) == 1                                          # the printed line replays it
    assert "FAIL" in capsys.readouterr().out


def test_a_domain_kernel_goes_through_the_workers_and_the_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registry, "KERNELS", dict(registry.KERNELS))
    db = tmp_path / "results.db"
    assert main(["tune", "--interpret", "--kernel-module", "softmax=fake_kernels.domain", "--kernel", "softmax",
                 "--sampler", "grid", "--db", str(db)]) == 0, capsys.readouterr().err
    with Store(str(db), readonly=True) as store:
        statuses = {json.dumps(t.config, sort_keys=True): t.status for t in store.trials(kernel="softmax")}
        [winner] = store.winners(kernel="softmax")
    assert statuses == {json.dumps({"MODE": m, "X": x}, sort_keys=True): "ok" if m == "ok" else "incorrect"
                        for m in ("ok", "wrong") for x in (1, 2)}
    assert winner.config["MODE"] == "ok" and winner.problem == Problem("softmax", 2, 1, 1, 8, 8, 24, "float32")


def test_a_database_row_never_imports_the_module_it_names(registered, tmp_path):
    import sqlite3
    from tunebench.device import DeviceIdentity
    db = tmp_path / "results.db"
    problem = Problem("rmsnorm", 2, 1, 1, 33, 33, 48, "float32")
    with Store(str(db)) as store:
        store.upsert_winner(DeviceIdentity.current(interpret=True), "rmsnorm", "h", problem, {"ROWS": 1}, 1.0, 1.0)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE kernels SET name = 'antigravity'")             # a module that acts when imported
    with pytest.warns(Warning, match="unknown kernel"):
        assert Store(str(db), readonly=True).winners() == []
    assert "antigravity" not in sys.modules

"""How worker processes start (tunebench.tune.startup): forked from a forkserver that imported torch, triton and the
worker's side once, each worker still runs in its own environment (its GPU, the interpreter on or off, what the
parent set before starting it), CUDA is not initialised before the fork, an interpreting worker really interprets,
and a forkserver whose triton is the other kind is not used for that kind."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tunebench.registry import KERNELS
from tunebench.shapes import Problem
from tunebench.tune import startup
from tunebench.tune.pool import Worker
from tunebench.tune.protocol import Identify

TESTS = pathlib.Path(__file__).parent
sys.path.insert(0, str(TESTS))  # startup_probe, here and (through the child's copy of sys.path) in the workers

from startup_probe import HEAVY, probe  # noqa: E402

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the forkserver is used on Linux only")
TINY = Problem("flash_v1", 1, 1, 1, 40, 40, 16, "float32")


def facts(*workers: Worker) -> list[dict]:
    """What each probe worker reports, started together as a fleet starts them."""
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.await_ready()
        return [w.call(Identify(), timeout=60.0).value for w in workers]
    finally:
        for w in workers:
            w.close()


def test_each_worker_sees_its_own_gpu_and_interpreter_setting(monkeypatch):
    monkeypatch.setattr(startup, "_refused", {})
    startup.context(True)  # the forkserver, if used, runs before the variable below is set
    # Set after the forkserver started: a forked worker sees it all the same, as a spawned one inherits it.
    monkeypatch.setenv("TUNEBENCH_PROBE_MARKER", "set late")
    gpu0, gpu1, cpu = facts(Worker("run", False, "0", serve=probe, name="gpu0"),
                            Worker("run", False, "1", serve=probe, name="gpu1"),
                            Worker("run", True, None, serve=probe, name="cpu"))
    assert (gpu0["CUDA_VISIBLE_DEVICES"], gpu0["torch_visible"]) == ("0", [0])
    assert (gpu1["CUDA_VISIBLE_DEVICES"], gpu1["torch_visible"]) == ("1", [1])
    for f in (gpu0, gpu1):
        assert (f["TRITON_INTERPRET"], f["interpret_knob"], f["tl_max"]) == ("0", False, "JITFunction")
    assert (cpu["TRITON_INTERPRET"], cpu["interpret_knob"], cpu["tl_max"]) == ("1", True, "InterpretedFunction")
    for f in (gpu0, gpu1, cpu):
        assert f["marker"] == "set late" and not f["cuda_initialized"]
    assert len({f["pid"] for f in (gpu0, gpu1, cpu)}) == 3


FRESH_PARENT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from startup_probe import probe
from tunebench.tune import startup
from tunebench.tune.pool import Worker
from tunebench.tune.protocol import Identify
out = []
for interpret in (True, False, True):
    w = Worker("run", interpret, None if interpret else "0", serve=probe)
    w.start()
    w.await_ready()
    out.append(w.call(Identify(), timeout=60.0).value)
    w.close()
print(json.dumps({"facts": out, "refused": {str(k): v for k, v in startup._refused.items()}}))
"""


@LINUX
def test_the_forkserver_serves_its_own_kind_and_the_other_kind_is_spawned():
    # A fresh parent with the interpreter off in its environment: its first worker interprets, so its forkserver
    # imports triton interpreting; a GPU worker (forked only when asked: $TUNEBENCH_START_METHOD) cannot use that
    # triton, says so, and is spawned; interpreting ones still fork.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[startup.START_METHOD] = "forkserver"
    done = subprocess.run([sys.executable, "-P", "-c", FRESH_PARENT, str(TESTS)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    first, gpu, again = result["facts"]
    assert first["preloaded"] == again["preloaded"] == list(HEAVY)  # forked from the forkserver, which had them
    assert first["tl_max"] == again["tl_max"] == "InterpretedFunction"
    assert gpu["preloaded"] == [] and gpu["tl_max"] == "JITFunction"  # spawned: imported its own triton
    assert list(result["refused"]) == ["False"] and "interpreter on" in result["refused"]["False"]


def test_a_forkserver_child_with_the_other_triton_or_tunebench_says_so(monkeypatch):
    # What enter() checks in the child, in this process: its triton (interpreting or not, as conftest chose) against
    # TRITON_INTERPRET, and its tunebench against the parent's.
    import triton
    interpreting = triton.knobs.runtime.interpret
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreting else "0")
    assert startup.preloaded_otherwise(startup.PACKAGE) == ""
    assert "parent runs /elsewhere/tunebench" in startup.preloaded_otherwise("/elsewhere/tunebench")
    monkeypatch.setenv("TRITON_INTERPRET", "0" if interpreting else "1")
    assert "this worker needs it" in startup.preloaded_otherwise(startup.PACKAGE)


NO_CUDA_IMPORT = """
import torch
calls = []
def refuse(name):
    def called(*args, **kwargs):
        calls.append(name)
        raise RuntimeError(f"{name} called while importing")
    return called
for owner, name in [(torch.cuda, "is_available"), (torch.cuda, "device_count"), (torch.cuda, "init"),
                    (torch.cuda, "_lazy_init"), (torch._C, "_cuda_init"), (torch._C, "_cuda_getDeviceCount")]:
    if hasattr(owner, name):
        setattr(owner, name, refuse(name))
from tunebench.tune.startup import PRELOAD
for module in PRELOAD:
    __import__(module)
print(calls, torch.cuda.is_initialized())
"""


def test_what_the_forkserver_imports_does_not_touch_cuda():
    # CUDA must never be initialised before a fork: no preloaded module may as much as ask for the device count.
    done = subprocess.run([sys.executable, "-P", "-c", NO_CUDA_IMPORT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["[]", "False"]


def test_an_interpreting_worker_runs_a_real_trial_whatever_the_parent_had():
    # With the parent's TRITON_INTERPRET off: the worker's triton must interpret all the same, or every trial of a
    # real kernel fails ("Cannot call @triton.jit'd outside of the scope of a kernel").
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-P", "-c", REAL_TRIAL], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "ok", done.stdout


REAL_TRIAL = f"""
from tunebench.registry import kernel_module
from tunebench.shapes import Problem
from tunebench.tune.pool import Worker
from tunebench.tune.protocol import Run
problem = {TINY!r}
w = Worker("run", True)
w.start()
w.await_ready()
event = w.call(Run("{KERNELS[TINY.kernel]}", problem, 0, kernel_module("{TINY.kernel}").DEFAULT), timeout=240.0)
w.close()
print(event.value.message if event.kind == "ok" else event.message)
print(event.value.status if event.kind == "ok" else event.kind)
"""


@pytest.mark.parametrize("value, expected", [("spawn", "spawn"), ("forkserver", "forkserver"), ("", None)])
def test_the_start_method_can_be_chosen(monkeypatch, value, expected):
    monkeypatch.setattr(startup, "_refused", {})
    monkeypatch.setenv(startup.START_METHOD, value)
    linux = sys.platform.startswith("linux")
    assert startup.method(True) == (expected or ("forkserver" if linux else "spawn"))
    assert startup.method(False) == (expected or "spawn")         # GPU workers: forked only when asked, for now
    monkeypatch.setattr(startup, "_refused", {True: "planted"})
    assert startup.method(True) == "spawn" and startup.method(False) == (expected or "spawn")
    monkeypatch.setenv(startup.START_METHOD, "fork")
    with pytest.raises(ValueError, match="spawn or forkserver"):
        startup.method(True)


def test_a_simulated_worker_is_spawned():
    # It imports no torch: a forkserver would import torch for nothing while the parent's loop is measured.
    from tunebench.tune.simulate import Simulation
    worker = Worker("run", True, serve=Simulation())
    try:
        worker.start()
        worker.await_ready()
        assert type(worker.process).__name__ == "SpawnProcess"
    finally:
        worker.close()

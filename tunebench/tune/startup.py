"""How the tuner starts a worker process: forked from a forkserver that has imported torch, triton and the worker's
side once (Linux), so that a fleet of N workers pays for one import of them rather than N at once, and a worker that
died is replaced in a fraction of the time; spawned elsewhere, or with TUNEBENCH_START_METHOD=spawn.

What a worker sets is its environment (child_environment: TRITON_INTERPRET and, on a GPU, CUDA_VISIBLE_DEVICES), taken
as its own before it imports anything of its own (enter). Of what the forkserver imports (PRELOAD):
- torch reads CUDA_VISIBLE_DEVICES when CUDA initialises, and importing torch, triton or the worker's side does not
  initialise CUDA: CUDA is never initialised before the fork, and each worker sees its own GPU.
- @triton.jit reads TRITON_INTERPRET when it decorates, and importing triton.language decorates its own functions
  (tl.max, tl.sum, ...): a triton imported under the other value fails every interpreted kernel with "Cannot call
  @triton.jit'd outside of the scope of a kernel" (triton 3.6). So the forkserver is started with TRITON_INTERPRET
  as the first fleet's workers will have it (context). A child forked from a forkserver whose triton is the other
  kind (a fleet of the other kind in the same process, or a forkserver that someone else started) says so instead of
  "ready", and the parent starts that kind of worker spawned from then on (Worker.await_ready).
- The forkserver finds tunebench on a fresh interpreter's sys.path, which is not always the parent's (`python
  bench/x.py` run from a checkout other than the installed one: the forkserver's has the current folder, the
  parent's the script's): a child whose tunebench is not its parent's says so too, and is spawned.
- multiprocessing has one forkserver per process, with the environment it was started with: each child is handed
  its parent's environment as of its own start, as a spawned child inherits it.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys

START_METHOD = "TUNEBENCH_START_METHOD"     # "spawn" or "forkserver": overrides the choice below
PRELOAD = ["torch", "triton.language", "tunebench.tune.worker"]
UNFIT = "unfit"                             # a child's first reply in place of "ready": its preload cannot serve it
PACKAGE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))     # this process's tunebench

_refused: dict[bool, str] = {}              # interpret -> why a forkserver child of that kind could not serve


def method(interpret: bool) -> str:
    """forkserver for interpreted workers on Linux (elsewhere, forking a process that has imported torch is not known
    to be safe), unless $TUNEBENCH_START_METHOD or a refusal says otherwise. A GPU worker is spawned unless
    $TUNEBENCH_START_METHOD=forkserver: no forked worker has yet run a compiled kernel on a GPU here, and a CUDA
    driver initialised before a fork fails in its children, so the default waits for a GPU run to show it works."""
    chosen = os.environ.get(START_METHOD, "")
    if chosen not in ("", "spawn", "forkserver"):
        raise ValueError(f"${START_METHOD} must be spawn or forkserver, got {chosen!r}")
    if interpret in _refused:
        return "spawn"
    return chosen or ("forkserver" if interpret and sys.platform.startswith("linux") else "spawn")


def context(interpret: bool, imports_torch: bool = True) -> multiprocessing.context.BaseContext:
    """The context to start a worker of this kind with; a forkserver is running when it is forkserver's. An entry
    point that imports no torch (a simulated worker) is spawned: it starts in a fraction of a second, and a forkserver
    would import torch for nothing."""
    ctx = multiprocessing.get_context(method(interpret) if imports_torch else "spawn")
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver  # not on Windows
        ctx.set_forkserver_preload(PRELOAD)
        with interpreting(interpret):  # what the forkserver's triton is imported under, if it starts now
            forkserver.ensure_running()
    return ctx


def refuse_forkserver(interpret: bool, reason: str) -> None:
    """A forkserver child of this kind could not serve (``reason``): those started after this are spawned."""
    _refused[interpret] = reason


def child_environment(interpret: bool, visible_device: str | None) -> dict[str, str]:
    """The environment a worker runs in: this process's, with the interpreter on or off and, for a GPU worker, its
    one GPU."""
    environ = dict(os.environ, TRITON_INTERPRET=_flag(interpret))
    if visible_device is not None:
        environ["CUDA_VISIBLE_DEVICES"] = visible_device
    return environ


def enter(environ: dict[str, str], package: str, serve, conn, *args) -> None:
    """The child's entry point: takes ``environ`` as its environment before it imports anything of its own, then
    serves (``serve(conn, *args)``: the real worker or a simulated one). ``package``: the parent's PACKAGE."""
    os.environ.clear()
    os.environ.update(environ)
    unfit = preloaded_otherwise(package)
    if unfit:
        conn.send((UNFIT, unfit))
        return
    serve(conn, *args)


def preloaded_otherwise(package: str) -> str:
    """Why what this process imported before the fork cannot serve it ('' when it can): a tunebench other than the
    parent's (``package``), or a triton imported under the other TRITON_INTERPRET."""
    if PACKAGE != package:
        return f"the forkserver imported tunebench from {PACKAGE}; this worker's parent runs {package}"
    tl = sys.modules.get("triton.language")
    if tl is None:
        return ""
    frozen = type(tl.max).__name__ == "InterpretedFunction"
    wanted = sys.modules["triton"].knobs.runtime.interpret
    if frozen == wanted:
        return ""
    return (f"the forkserver imported triton with the interpreter {'on' if frozen else 'off'}; this worker needs it "
            f"{'on' if wanted else 'off'}")


@contextlib.contextmanager
def interpreting(interpret: bool):
    """TRITON_INTERPRET as the workers will have it, for the block: the forkserver's imports read it, and while tuning
    keep() reads it (no TMA under the interpreter): the parent must prune exactly what the workers could not run."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = _flag(interpret)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def _flag(interpret: bool) -> str:
    return "1" if interpret else "0"

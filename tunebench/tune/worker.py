"""A trial runs in a worker process of its own: compile -> check -> time.

Why a process: an illegal memory access poisons a CUDA context for good, and a kernel can hang. So the parent (the
tuner) never launches a kernel; it sends requests to worker processes (tunebench.tune.pool: Worker), waits with a
deadline, and kills and respawns a worker that hangs, dies, or reports that its CUDA context is gone. The study goes
on. This module is the worker's side.

Each stage is a small function that returns a value or an Outcome (a status):
- compile: the first launch, into a NaN-poisoned output. Triton compiles here (or loads what the compile workers put
  in its on-disk cache). An exception is a compile_error (out_of_resources for Triton's OutOfResources or a CUDA
  out-of-memory); a CUDA fault is crashed, and fatal to the worker.
- check: the inputs must be unchanged (a kernel that writes into them is incorrect, and they are restored for the
  next trial), and the output must be close enough to the reference (tunebench.correctness, the one rule).
- time: do_bench median/p20/p80 with L2 flush (tunebench.tune.timing), plus TFLOP/s or GB/s.

The Workload (inputs plus the float64 and low-precision references) is built once per problem in each worker, not
per trial.

Compile workers run the same launch path with Triton's JIT in warmup mode (compile, never launch), on the same
Workload, so the GPU worker's first launch of a config finds it in Triton's on-disk cache.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import multiprocessing
import os
import signal
import threading

import torch
import triton
import triton.language as tl

from ..correctness import Verdict, close_enough
from ..inputs import Workload, workload_for
from ..shapes import Problem
from .protocol import Compile, Identify, Outcome, Retime, Run, Setup
from .serving import reply, serve_requests
from . import timing, trace

MESSAGE_CHARS = 2000
# Messages of errors after which a CUDA context is unusable: the worker reports the trial and exits.
CUDA_FAULTS = ("illegal memory access", "illegal instruction", "misaligned address", "unspecified launch failure",
               "device-side assert", "an illegal", "Triton Error [CUDA]", "CUDA error", "AcceleratorError")


# -- the trial pipeline (in a worker)


def run_trial(workload: Workload, module, config: dict, bench: timing.Bench) -> Outcome:
    try:
        verdict = checked(workload, module, config)
        if isinstance(verdict, Outcome):
            return verdict
        return time_(workload, module, config, bench, verdict)
    except Exception as e:  # a CUDA fault surfacing in a copy or a comparison, or a bug: the trial crashed
        return failure(e, "crashed", "trial")


def checked(workload: Workload, module, config: dict) -> Verdict | Outcome:
    """A trial's checks before it is timed: the first launch (compile_), then check."""
    inputs = launch_inputs(workload, module, config)
    out = compile_(workload, module, config)
    if isinstance(out, Outcome):
        return out
    return check(workload, out, inputs)


def compile_(workload: Workload, module, config: dict) -> torch.Tensor | Outcome:
    """The first launch: Triton compiles the config (or loads it from its cache) and runs it once."""
    try:
        out = workload.run(module, config)
        synchronize(workload.device)
        return out
    except Exception as e:
        return failure(e, "compile_error", "first launch")


def check(workload: Workload, out: torch.Tensor, inputs: list) -> Verdict | Outcome:
    """Inputs unchanged and the output close enough to the float64 reference (NaN, e.g. unwritten, never passes)."""
    changed = [name for name, tensor, pristine in inputs if not torch.equal(tensor, pristine)]
    if changed:
        for _, tensor, pristine in inputs:
            tensor.copy_(pristine)  # the next trial gets the inputs every trial was meant to get
        return Outcome("incorrect", f"the kernel wrote into its inputs: {', '.join(changed)}")
    ref64, lowp = workload.references()
    verdict = close_enough(out, ref64, lowp)
    if not verdict.ok:
        return Outcome("incorrect", verdict.reason, err_ratio=verdict.ratio)
    return verdict


def time_(workload: Workload, module, config: dict, bench: timing.Bench, verdict: Verdict) -> Outcome:
    try:
        t = bench(launcher(workload, module, config))
    except Exception as e:
        return failure(e, "crashed", "timing")
    return Outcome("ok", median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                   throughput=workload.throughput(t.median_ms), err_ratio=verdict.ratio)


def launcher(workload: Workload, module, config: dict):
    """A no-argument launch of one config on the workload's inputs, as do_bench wants it."""
    args, kwargs, out = workload.args(config), workload.kwargs(), workload.out
    return lambda: module.launch(*args, config=config, out=out, **kwargs)


def launch_inputs(workload: Workload, module, config: dict) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, tensor, pristine copy) of every tensor passed to launch, to catch a kernel writing into its inputs."""
    args = workload.args(config)
    names = list(inspect.signature(module.launch).parameters)[:len(args)]
    return [(name, t, t.clone()) for name, t in zip(names, args) if isinstance(t, torch.Tensor)]


def retime(workload: Workload, module, configs: list[dict], bench: timing.Bench, rounds: int,
           first: int = 0, peer: tuple = ()) -> list[list[float]]:
    """The finalists against each other: interleaved rounds on one worker, so that noise does not pick the winner.
    ``peer`` (module path, config): another kernel's config on the same inputs, in the same rounds, its medians
    last. It goes through a trial's checks first (it launches, leaves its inputs as they were, and its output is
    close enough to the float64 reference); failing any, its entry is [] (not timed) and the finalists are timed as
    without it."""
    fns = [launcher(workload, module, c) for c in configs]
    if not peer:
        return timing.interleaved(fns, bench, rounds, first)
    peer_module, peer_config = importlib.import_module(peer[0]), peer[1]
    verdict = checked(workload, peer_module, peer_config)
    if isinstance(verdict, Outcome):
        if verdict.fatal:
            raise RuntimeError(verdict.message)     # a CUDA fault: the worker is replaced, the re-timing fails
        return timing.interleaved(fns, bench, rounds, first) + [[]]
    return timing.interleaved(fns + [launcher(workload, peer_module, peer_config)], bench, rounds, first)


def precompile(workload: Workload, module, config: dict) -> str:
    """Compiles a config's kernels into Triton's on-disk cache without launching them ('' or the error)."""
    try:
        with warmup_only():
            module.launch(*workload.args(config), config=config, out=workload.out, **workload.kwargs())
        return ""
    except Exception as e:  # the GPU worker meets the same error and classifies it
        return f"{type(e).__name__}: {e}"[:MESSAGE_CHARS]


@contextlib.contextmanager
def warmup_only():
    """Makes ``kernel[grid](...)`` compile without launching (JITFunction.run(..., warmup=True), as Triton's own
    ``kernel.warmup`` does), so a kernel module's unchanged launch path fills the cache with exactly the
    specialisation (shapes, strides, alignment, constexprs, num_warps/num_stages) that the GPU worker will ask for."""
    from triton.runtime.jit import KernelInterface
    original = KernelInterface.__getitem__

    def compile_only(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=True, **kwargs)

    KernelInterface.__getitem__ = compile_only
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


def failure(error: Exception, status: str, stage: str) -> Outcome:
    """An exception as a trial status: Triton's OutOfResources or a CUDA out-of-memory is out_of_resources, a CUDA
    fault is crashed (and fatal to the worker), anything else is ``status``."""
    from triton.runtime.errors import OutOfResources
    message = f"{stage}: {type(error).__name__}: {error}"[:MESSAGE_CHARS]
    if isinstance(error, (OutOfResources, torch.OutOfMemoryError)):
        return Outcome("out_of_resources", message)
    if is_cuda_fault(error):
        return Outcome("crashed", message, fatal=True)
    return Outcome(status, message)


def is_cuda_fault(error: Exception) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    text = f"{type(error).__name__}: {error}"
    return isinstance(error, RuntimeError) and any(marker in text for marker in CUDA_FAULTS)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the worker process


class _WorkerState:
    def __init__(self, role: str, interpret: bool):
        self.role, self.interpret = role, interpret
        self.device = torch.device("cpu" if interpret else "cuda")
        self.workload: Workload | None = None
        self.loaded: tuple | None = None

    def handle(self, request) -> tuple[tuple, bool]:
        """(reply, fatal): reply is ("ok", value) or ("error", message); fatal when this process's CUDA context is
        unusable."""
        try:
            if isinstance(request, Identify):
                from ..device import DeviceIdentity
                return ("ok", DeviceIdentity.current(self.interpret, device_index=None)), False
            module = importlib.import_module(request.module) if getattr(request, "module", "") else None
            if isinstance(request, Setup):
                self.setup(request.problem, request.seed, module)
                return ("ok", None), False
            workload = self.setup(request.problem, request.seed, module)
            if isinstance(request, Run):
                outcome = run_trial(workload, module, request.config, self.bench(request.problem))
                return ("ok", outcome), outcome.fatal
            if isinstance(request, Compile):
                return ("ok", precompile(workload, module, request.config)), False
            if isinstance(request, Retime):
                return ("ok", retime(workload, module, request.configs, self.bench(request.problem),
                                     request.rounds, request.first, request.peer)), False
            return ("error", f"unknown request {request!r}"), False
        except Exception as e:
            return ("error", f"{type(e).__name__}: {e}"[:MESSAGE_CHARS]), is_cuda_fault(e)

    def bench(self, problem: Problem) -> timing.Bench:
        return timing.bench_for(self.interpret, paged=problem.paged)

    def setup(self, problem: Problem, seed: int, module=None) -> Workload:
        """The problem's inputs (and, for a run worker, its references), built once and kept until the next problem."""
        if self.loaded != (problem, seed):
            self.workload = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give the last problem's memory back to the other processes on this GPU
            # A compile worker needs the inputs' shapes, dtypes and alignment, not their values.
            self.workload = workload_for(problem, module, seed, self.device, fill=self.role == "run")
            if self.role == "run":
                self.workload.references()
            self.loaded = (problem, seed)
        return self.workload


def warm(interpret: bool) -> None:
    """What every process pays once before its first request, paid while the parent is still starting up (reading
    the device, opening the first study): the CUDA context (the driver creates one at a time per GPU, so many workers
    on one GPU queue for it) and Triton's compiler, driver and launcher (a worker's first compile costs several times
    its later ones). A failure here is left for the first request to meet and report, as it would without the
    warm-up."""
    if interpret:
        return
    try:
        x = torch.zeros(1, device="cuda")
        _warm_kernel[(1,)](x)
        torch.cuda.synchronize()
    except Exception:
        pass


@triton.jit
def _warm_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)


def worker_main(conn, role: str, interpret: bool, visible_device: str | None, threads: int, name: str = "") -> None:
    """Entry point of a worker process, whose environment (TRITON_INTERPRET, CUDA_VISIBLE_DEVICES: ``interpret`` and
    ``visible_device``) was set before this module and triton were imported (tunebench.tune.startup.enter)."""
    trace.in_worker()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes the workers
    _exit_with_parent()
    torch.set_num_threads(max(1, threads))
    state = _WorkerState(role, interpret)
    if not reply(conn, ("ready", os.getpid())):
        return
    trace.event("worker_ready", worker=name, started=trace.process_started())
    warm(interpret)
    trace.event("warmed", worker=name)
    serve_requests(conn, state.handle)


def _exit_with_parent() -> None:
    """A worker whose parent was killed (kill -9) exits too, even from inside a hung kernel, instead of holding the
    GPU as an orphan. The parent is the process that started this one (its end of the start-up pipe closes as it
    dies), not os.getppid(): a forkserver's child has the forkserver for its Unix parent."""
    parent = multiprocessing.parent_process()
    if parent is None:  # called in a process of its own (a test): nothing to watch
        return

    def watch():
        parent.join()
        os._exit(4)

    threading.Thread(target=watch, name="tunebench-parent-watch", daemon=True).start()

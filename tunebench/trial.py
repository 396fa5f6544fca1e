"""A trial runs in a worker process of its own: compile -> check -> time.

Why a process: an illegal memory access poisons a CUDA context for good, and a kernel can hang. So the parent (the
tuner) never launches a kernel; it sends requests to spawned workers, waits with a deadline, and kills and respawns a
worker that hangs, dies, or reports that its CUDA context is gone. The study goes on.

Each stage is a small function that returns a value or an Outcome (a status):
- compile: the first launch, into a NaN-poisoned output. Triton compiles here (or loads what the compile workers put
  in its on-disk cache). An exception is a compile_error (out_of_resources for Triton's OutOfResources or a CUDA
  out-of-memory); a CUDA fault is crashed, and fatal to the worker.
- check: the inputs must be unchanged (a kernel that writes into them is incorrect, and they are restored for the
  next trial), and the output must be close enough to the reference (tunebench.correctness, the one rule).
- time: do_bench median/p20/p80 with L2 flush (tunebench.timing), plus TFLOP/s or GB/s.

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
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_connections

import torch

from .correctness import Verdict, close_enough
from .shapes import Problem
from .workloads import Workload
from . import timing, trace

MESSAGE_CHARS = 2000
STARTUP_TIMEOUT_S = 180.0   # importing torch and triton in a fresh process; slow on a loaded CI machine
# Messages of errors after which a CUDA context is unusable: the worker reports the trial and exits.
CUDA_FAULTS = ("illegal memory access", "illegal instruction", "misaligned address", "unspecified launch failure",
               "device-side assert", "an illegal", "Triton Error [CUDA]", "CUDA error", "AcceleratorError")


@dataclass
class Outcome:
    """What one trial came to: a status (tunebench.store.STATUSES) and, for ok, its timing."""
    status: str
    message: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    throughput: float | None = None
    err_ratio: float | None = None
    fatal: bool = False     # the worker's CUDA context is unusable: it exits after replying


# -- the trial pipeline (in a worker)


def run_trial(workload: Workload, module, config: dict, bench: timing.Bench) -> Outcome:
    try:
        inputs = launch_inputs(workload, module, config)
        out = compile_(workload, module, config)
        if isinstance(out, Outcome):
            return out
        verdict = check(workload, out, inputs)
        if isinstance(verdict, Outcome):
            return verdict
        return time_(workload, module, config, bench, verdict)
    except Exception as e:  # a CUDA fault surfacing in a copy or a comparison, or a bug: the trial crashed
        return failure(e, "crashed", "trial")


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
                   throughput=timing.throughput(workload.problem, t.median_ms), err_ratio=verdict.ratio)


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
           first: int = 0) -> list[list[float]]:
    """The finalists against each other: interleaved rounds on one worker, so that noise does not pick the winner."""
    return timing.interleaved([launcher(workload, module, c) for c in configs], bench, rounds, first)


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


# -- requests the parent sends (picklable; the worker imports the kernel module by its registry path)


@dataclass(frozen=True)
class Identify:
    pass


@dataclass(frozen=True)
class Setup:
    problem: Problem
    seed: int


@dataclass(frozen=True)
class Run:
    module: str
    problem: Problem
    seed: int
    config: dict = field(hash=False)


@dataclass(frozen=True)
class Compile:
    module: str
    problem: Problem
    seed: int
    config: dict = field(hash=False)


@dataclass(frozen=True)
class Retime:
    module: str
    problem: Problem
    seed: int
    configs: list = field(hash=False)
    rounds: int = 3
    first: int = 0      # the number of the first round (rounds shared among runners)


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
                from .device import DeviceIdentity
                return ("ok", DeviceIdentity.current(self.interpret, device_index=None)), False
            if isinstance(request, Setup):
                self.setup(request.problem, request.seed)
                return ("ok", None), False
            module = importlib.import_module(request.module)
            workload = self.setup(request.problem, request.seed)
            if isinstance(request, Run):
                outcome = run_trial(workload, module, request.config, self.bench(request.problem))
                return ("ok", outcome), outcome.fatal
            if isinstance(request, Compile):
                return ("ok", precompile(workload, module, request.config)), False
            if isinstance(request, Retime):
                return ("ok", retime(workload, module, request.configs, self.bench(request.problem),
                                     request.rounds, request.first)), False
            return ("error", f"unknown request {request!r}"), False
        except Exception as e:
            return ("error", f"{type(e).__name__}: {e}"[:MESSAGE_CHARS]), is_cuda_fault(e)

    def bench(self, problem: Problem) -> timing.Bench:
        return timing.bench_for(self.interpret, paged=problem.paged)

    def setup(self, problem: Problem, seed: int) -> Workload:
        """The problem's inputs (and, for a run worker, its references), built once and kept until the next problem."""
        if self.loaded != (problem, seed):
            self.workload = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give the last problem's memory back to the other processes on this GPU
            # A compile worker needs the inputs' shapes, dtypes and alignment, not their values.
            self.workload = Workload(problem, seed, self.device, fill=self.role == "run")
            if self.role == "run":
                self.workload.references()
            self.loaded = (problem, seed)
        return self.workload


def worker_main(conn, role: str, interpret: bool, visible_device: str | None, threads: int) -> None:
    """Entry point of a spawned worker: set the environment before any kernel module is imported, then serve."""
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    if visible_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_device
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes the workers
    _exit_with_parent(os.getppid())
    torch.set_num_threads(max(1, threads))
    state = _WorkerState(role, interpret)
    if not _reply(conn, ("ready", os.getpid())):
        return
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        reply, fatal = state.handle(request)
        if not _reply(conn, (*reply, fatal)):
            return
        if fatal:
            conn.close()
            os._exit(3)  # this CUDA context is unusable; the parent starts a fresh process


def _reply(conn, message) -> bool:
    """Sends to the parent; False when the parent is gone (killed, or closed its end), and the worker should exit
    quietly rather than print a BrokenPipeError."""
    try:
        conn.send(message)
        return True
    except OSError:  # BrokenPipeError, ConnectionResetError: the other end is closed
        return False


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (kill -9) exits too, even from inside a hung kernel, instead of holding the
    GPU as an orphan."""
    def watch():
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(4)

    threading.Thread(target=watch, name="tunebench-parent-watch", daemon=True).start()


# -- a worker seen from the parent


@dataclass
class Event:
    """What became of a request: kind is "ok" (value), "error" (message: the request failed in the worker, e.g. its
    problem could not be set up), "died" (the process exited) or "timeout" (killed at its deadline)."""
    kind: str
    value: object = None
    message: str = ""


class Worker:
    """One worker process: one request at a time, each with a deadline. A worker that hangs is killed; one that dies
    (or reports a fatal CUDA fault) is replaced by a fresh process. A request for a problem the worker has not set up
    is preceded by a Setup with its own, longer deadline, so a trial's timeout never pays for building references."""

    def __init__(self, role: str, interpret: bool, visible_device: str | None = None, threads: int = 1,
                 setup_timeout: float = 600.0, name: str = ""):
        self.role, self.interpret, self.visible_device = role, interpret, visible_device
        self.threads, self.setup_timeout = threads, setup_timeout
        self.name = name or role
        self.process = None
        self.conn = None
        self.loaded: tuple | None = None
        self.request = None
        self.timeout = 0.0
        self.phase: str | None = None       # None (idle), "setup" or "run"
        self.deadline = float("inf")
        self.restarts = 0
        self.exiting = False                # asked to exit (ask_to_exit)

    @property
    def busy(self) -> bool:
        return self.phase is not None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        process = ctx.Process(target=worker_main, name=f"tunebench-{self.name}", daemon=True,
                              args=(child, self.role, self.interpret, self.visible_device, self.threads))
        try:
            process.start()
        except BaseException:
            conn.close()  # a process that never started is not kept: close() has nothing of it to stop
            raise
        finally:
            child.close()
        self.process, self.conn = process, conn
        self.loaded = None  # a fresh process has no problem set up
        self.exiting = False
        trace.event("spawn", worker=self.name)

    def await_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        try:
            ready = self.conn.poll(timeout)
            reply = self.conn.recv() if ready else None
        except (EOFError, OSError):
            reply = None
        if reply is None or reply[0] != "ready":
            code = self._stop()
            raise RuntimeError(f"the {self.name} worker process did not start ({describe_exit(code)})")
        trace.event("ready", worker=self.name)

    def submit(self, request, timeout: float) -> None:
        assert not self.busy, f"{self.name} worker is busy"
        self.request, self.timeout = request, timeout
        key = (request.problem, request.seed) if hasattr(request, "problem") else None
        if key is not None and key != self.loaded:
            self._send(Setup(*key), "setup", self.setup_timeout)
        else:
            self._send(request, "run", timeout)

    def call(self, request, timeout: float) -> Event:
        """submit, then wait for the outcome (for the odd request outside the event loop: identify, re-time)."""
        self.submit(request, timeout)
        while True:
            if wait_for_connections([self.conn], max(0.0, self.deadline - time.monotonic())):
                event = self.receive()
            elif time.monotonic() >= self.deadline:
                event = self.expire()
            else:
                continue
            if event is not None:
                return event

    def receive(self) -> Event | None:
        """Reads the reply now waiting on the connection: an Event, or None when it only finished the setup step."""
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            code = self.restart()
            return self._finish(Event("died", message=f"worker process died ({describe_exit(code)})"))
        kind, value, fatal = reply
        if fatal:
            self.restart()  # it exits after this reply; its CUDA context is gone
        if self.phase == "setup":
            if kind != "ok":
                self.loaded = None
                return self._finish(Event("error", message=f"setting up the problem failed: {value}"))
            self.loaded = (self.request.problem, self.request.seed)
            if isinstance(self.request, Setup):
                return self._finish(Event("ok"))
            self._send(self.request, "run", self.timeout)
            return None
        return self._finish(Event(kind, value if kind == "ok" else None, "" if kind == "ok" else str(value)))

    def expire(self) -> Event:
        """The deadline passed: kill the process and start a fresh one."""
        phase, timeout = self.phase, (self.setup_timeout if self.phase == "setup" else self.timeout)
        self.restart()
        if phase == "setup":
            return self._finish(Event("error", message=f"setting up the problem took more than {timeout:.0f} s"))
        return self._finish(Event("timeout", message=f"no result after {timeout:.0f} s: the worker was killed"))

    def cancel(self) -> None:
        """Drops the request in progress, if any, by replacing the process."""
        if self.busy:
            self.restart()
            self._finish(Event("cancelled"))

    def restart(self) -> int | None:
        code = self._stop()
        self.restarts += 1
        self.start()
        self.await_ready()
        return code

    def ask_to_exit(self) -> None:
        """Tells an idle worker to exit, without waiting: a fleet asks all of its workers first, then joins them, so
        that their interpreters shut down at once (one by one, 18 workers took 8 s on an H200 pair)."""
        if self.process is not None and self.process.is_alive() and not self.busy and not self.exiting:
            self.exiting = True
            with contextlib.suppress(OSError):  # BrokenPipeError is one: the process is gone already
                self.conn.send(None)

    def close(self) -> None:
        if self.process is None:
            return
        self.ask_to_exit()
        if self.exiting:
            self.process.join(2.0)
        self._stop()
        self.process = None

    def _send(self, request, phase: str, timeout: float) -> None:
        self.phase, self.deadline = phase, time.monotonic() + timeout
        trace.event("send", worker=self.name, request=type(request).__name__)
        try:
            self.conn.send(request)
        except OSError:  # BrokenPipeError: the process is gone; receive() sees EOF and reports it as died
            pass

    def _finish(self, event: Event) -> Event:
        trace.event("done", worker=self.name, result=event.kind)
        self.request, self.phase, self.deadline = None, None, float("inf")
        return event

    def _stop(self) -> int | None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10.0)
        with contextlib.suppress(OSError):
            self.conn.close()
        return self.process.exitcode


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"

"""Worker processes seen from the parent (the tuner): the requests it sends, what comes back, and Worker, which starts
a process, sends it one request at a time with a deadline, and kills and replaces it when it hangs or dies. The work
itself runs in tunebench.trial, in the worker.

Nothing here imports torch: `tunebench tune` spawns its workers before it imports torch itself (2-3 s), so that
they start while it opens its databases.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_connections

from .shapes import Problem
from . import trace

STARTUP_TIMEOUT_S = 180.0   # importing torch and triton in a fresh process; slow on a loaded CI machine


# -- what a trial came to


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


# -- requests the parent sends (picklable; the worker imports the kernel module by its registry path)


@dataclass(frozen=True)
class Identify:
    pass


@dataclass(frozen=True)
class Setup:
    problem: Problem
    seed: int


@dataclass(frozen=True)
class _OneConfig:
    """A request about one config of one problem; the worker tells the kinds apart by their class."""
    module: str
    problem: Problem
    seed: int
    config: dict = field(hash=False)


@dataclass(frozen=True)
class Run(_OneConfig):
    """Compile (or load from the cache), check and time the config."""


@dataclass(frozen=True)
class Compile(_OneConfig):
    """Compile the config into Triton's on-disk cache without launching it."""


@dataclass(frozen=True)
class Retime:
    module: str
    problem: Problem
    seed: int
    configs: list = field(hash=False)
    rounds: int = 3
    first: int = 0      # the number of the first round (rounds shared among runners)


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
        self.ready = False                  # its process said it is ready (await_ready)

    @property
    def busy(self) -> bool:
        return self.phase is not None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        process = ctx.Process(target=_serve, name=f"tunebench-{self.name}", daemon=True,
                              args=(child, self.role, self.interpret, self.visible_device, self.threads, self.name))
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
        self.ready = False
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
        self.ready = True
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


def _serve(*args) -> None:
    """The spawned process's entry point: the worker's side (and torch) is imported there, not in the parent."""
    from .trial import worker_main
    worker_main(*args)

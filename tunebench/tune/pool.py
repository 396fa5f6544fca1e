"""The parent's handle on its worker processes: Worker starts one, sends it one request at a time with a deadline
(and one more run to start after it), and kills and replaces it when it hangs or dies; Fleet is the run's set of them
and the one loop that waits on their replies. The work itself runs in tunebench.tune.worker, in the worker process.

Nothing here imports torch: `tunebench tune` starts its workers before it imports torch itself (2-3 s), so that
they start while it opens its databases. How a process is started (forked from a forkserver that has imported torch,
or spawned) is tunebench.tune.startup's.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from multiprocessing.connection import wait as wait_for_connections
from typing import TYPE_CHECKING, Callable, Protocol

from .protocol import Event, Identify, Run, Setup
from . import startup, trace

if TYPE_CHECKING:
    from .options import TuneOptions

STARTUP_TIMEOUT_S = 180.0   # importing torch and triton in a fresh process; slow on a loaded CI machine
MAX_COMPILE_WORKERS = 8         # per runner: two GPUs take twice the compiles per second
CHOOSING_POLL_S = 0.05          # how often to look again when only another process's trial holds work back
NO_GPU = ("no GPU: CUDA is not available here. Use `tunebench tune --interpret` to run the whole pipeline on the CPU "
          "under the Triton interpreter (a test of the pipeline, not a speed measurement), or run on a GPU machine")


class Worker:
    """One worker process: one request at a time, each with a deadline. A worker that hangs is killed; one that dies
    (or reports a fatal CUDA fault) is replaced by a fresh process. A request for a problem the worker has not set up
    is preceded by a Setup with its own, longer deadline, so a trial's timeout never pays for building references.

    One more request may wait behind the one in progress (``enqueue``): it is sent at once, and the process, which
    serves its pipe in order, starts it as soon as it has replied to the first, without waiting for the parent to
    read that reply and send the next (the parent's loop serves every GPU, and its writes and asks for one reply
    would otherwise delay the others' next trials). Its deadline starts when the first's reply is read. If the
    process is replaced before it started (the first hung, died or was fatal), it is sent again to the fresh one;
    only ``cancel`` drops it."""

    def __init__(self, role: str, interpret: bool, visible_device: str | None = None, threads: int = 1,
                 setup_timeout: float = 600.0, name: str = "", serve: Callable[..., None] | None = None):
        self.role, self.interpret, self.visible_device = role, interpret, visible_device
        # The process's entry point: the real worker, or a simulated one (tunebench.tune.simulate); picklable. One
        # whose ``imports_torch`` is False is spawned (tunebench.tune.startup.context).
        self.serve = serve or _serve
        self.threads, self.setup_timeout = threads, setup_timeout
        self.name = name or role
        self.process = None
        self.method = ""                    # how its process was started: "forkserver" or "spawn"
        self.conn = None
        self.loaded: tuple | None = None
        self.request = None
        self.timeout = 0.0
        self.phase: str | None = None       # None (idle), "setup" or "run"
        self.deadline = float("inf")
        self.restarts = 0
        self.exiting = False                # asked to exit (ask_to_exit)
        self.ready = False                  # its process said it is ready (await_ready)
        self.queued: tuple | None = None    # (request, timeout, sent to this process) waiting behind the request

    @property
    def busy(self) -> bool:
        return self.phase is not None

    def start(self) -> None:
        ctx = startup.context(self.interpret, imports_torch=getattr(self.serve, "imports_torch", True))
        conn, child = ctx.Pipe()
        environ = startup.child_environment(self.interpret, self.visible_device)
        process = ctx.Process(target=startup.enter, name=f"tunebench-{self.name}", daemon=True,
                              args=(environ, startup.PACKAGE, self.serve, child, self.role, self.interpret,
                                    self.visible_device, self.threads, self.name))
        try:
            process.start()
        except BaseException:
            conn.close()  # a process that never started is not kept: close() has nothing of it to stop
            raise
        finally:
            child.close()
        self.process, self.conn, self.method = process, conn, ctx.get_start_method()
        self.loaded = None  # a fresh process has no problem set up
        self.exiting = False
        if self.queued is not None:  # the process it was sent to is gone: it is sent again once it is due
            self.queued = (*self.queued[:2], False)
        self.ready = False
        trace.event("spawn", worker=self.name, method=self.method)

    def await_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        try:
            ready = self.conn.poll(timeout)
            reply = self.conn.recv() if ready else None
        except (EOFError, OSError):
            reply = None
        if reply is not None and reply[0] == startup.UNFIT and self.method == "forkserver":  # spawn it instead
            self._stop()
            startup.refuse_forkserver(self.interpret, reply[1])
            self.start()
            return self.await_ready(timeout)
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
            self._send(Setup(*key, module=request.module), "setup", self.setup_timeout)
        else:
            self._send(request, "run", timeout)

    def can_enqueue(self, problem, seed: int) -> bool:
        """Whether a Run of ``problem`` may wait behind the request in progress: a Run of the same problem, which this
        process has set up (not a Setup: its Run is sent only once it is done), with nothing waiting yet."""
        return (self.phase == "run" and self.queued is None and isinstance(self.request, Run)
                and self.loaded == (problem, seed) == (self.request.problem, self.request.seed))

    def enqueue(self, request: Run, timeout: float) -> None:
        """Sends ``request`` to wait behind the one in progress (see can_enqueue)."""
        assert self.can_enqueue(request.problem, request.seed), f"{self.name} worker cannot queue {request!r}"
        self.queued = (request, timeout, True)
        trace.event("send", worker=self.name, request=type(request).__name__, queued=True)
        try:
            self.conn.send(request)
        except OSError:  # the process is gone: receive() sees EOF, and the request is sent again to the fresh one
            pass

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
        """Drops the request in progress, if any, and the one waiting behind it, by replacing the process."""
        if self.busy:
            self.queued = None
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
        that their interpreters shut down at once rather than one after another."""
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
        """Ends the request in progress with ``event``; the one waiting behind it, if any, is now in progress."""
        trace.event("done", worker=self.name, result=event.kind)
        self.request, self.phase, self.deadline = None, None, float("inf")
        if self.queued is not None:
            request, timeout, sent = self.queued
            self.queued = None
            if sent:  # the process has it, and has started it
                self.request, self.timeout = request, timeout
                self.phase, self.deadline = "run", time.monotonic() + timeout
            else:
                self.submit(request, timeout)
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
    """The worker process's entry point: the worker's side (and triton) is imported there, not in the parent."""
    from .worker import worker_main
    worker_main(*args)


class Tail(Protocol):
    """A problem whose search has handed off its last configs (Search.hand_off): the fleet serves it before the
    current search, keeps its trials alive, and abandons it if the run stops."""

    def serve(self) -> None:
        """Gives idle runners the configs it has left to run."""

    def beat(self) -> None:
        """Records a heartbeat for its open trials."""

    def abandon(self, replace_busy: bool) -> None:
        """Leaves its unfinished trials for a later run."""


class Fleet:
    """The run's worker processes: `runners` check and time trials (one per GPU, pinned with CUDA_VISIBLE_DEVICES,
    or CPU interpreter workers), `compilers` fill Triton's cache ahead of them."""

    def __init__(self, options: "TuneOptions", serve: Callable[..., None] | None = None):
        """``serve``: the workers' entry point, if not the real worker's (a simulated fleet:
        tunebench.tune.simulate)."""
        n = options.workers
        if options.interpret:
            # Nothing to compile ahead under the interpreter, unless asked for (the tests do, to run the scheduling
            # of compile workers on a CPU: there, Triton's warmup returns without running the kernel).
            devices, threads, n_compile = [None] * n, max(1, (os.cpu_count() or 1) // n), options.compile_workers or 0
        else:
            devices, threads = visible_devices(n), 4
            n_compile = options.compile_workers
            if n_compile is None:
                n_compile = min(MAX_COMPILE_WORKERS * n, max(0, (os.cpu_count() or 1) - n - 1))
        self.runners = [Worker("run", options.interpret, d, threads, options.setup_timeout, name=f"run{i}",
                               serve=serve)
                        for i, d in enumerate(devices)]
        # Spread over the GPUs: each compile worker holds a CUDA context (its inputs' shapes and alignment are real
        # tensors), and the driver creates one context at a time per GPU.
        self.compilers = [Worker("compile", options.interpret, devices[i % n], 1, options.setup_timeout,
                                 name=f"compile{i}", serve=serve)
                          for i in range(n_compile)]
        self.workers = self.runners + self.compilers
        # Requests outside the search that the fleet is serving (a finished problem's finalists being re-timed, a
        # handed-off problem's last trials), and what to do with each reply.
        self.background: dict[Worker, Callable[[Event], None]] = {}
        self.tails: list[Tail] = []     # handed-off searches, oldest first

    def __enter__(self) -> "Fleet":
        try:
            self.start()
            self.await_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def starting(self):
        """The fleet with its processes started, not yet awaited: they start (torch and triton imported, or forked
        from a forkserver that imported them) while the caller does other work, then call ``await_ready``. Closed on
        leaving."""
        try:
            self.start()
            yield self
        finally:
            self.close()

    def start(self) -> None:
        for w in self.workers:
            if w.process is None:
                w.start()

    def await_ready(self) -> None:
        try:
            for w in self.workers:
                if not w.ready:
                    w.await_ready()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.background.clear()
        self.tails.clear()
        for w in self.workers:
            w.ask_to_exit()
        for w in self.workers:
            if w.process is not None:
                w.close()

    def identify(self):
        """The device every runner sees (read in the workers: the parent never initialises a CUDA context)."""
        identities = []
        for w in self.runners:
            event = w.call(Identify(), timeout=120.0)
            if event.kind != "ok":
                raise RuntimeError(f"cannot read the device identity in worker {w.name}: {event.message}")
            identities.append(event.value)
        if len({d.name for d in identities}) > 1:
            raise RuntimeError(f"--workers needs one kind of GPU, found {sorted({d.name for d in identities})}: "
                               f"choose them with CUDA_VISIBLE_DEVICES")
        return identities[0]

    # -- requests outside the current search

    def submit_background(self, worker: Worker, request, timeout: float, on_reply: Callable[[Event], None]) -> None:
        """Sends a request whose reply goes to ``on_reply`` (called from ``wait``) rather than to the search."""
        worker.submit(request, timeout)
        self.redirect(worker, on_reply)

    def redirect(self, worker: Worker, on_reply: Callable[[Event], None]) -> None:
        """The reply to the request ``worker`` is serving goes to ``on_reply`` rather than to the search."""
        self.background[worker] = on_reply

    def hand_off(self, tail: Tail) -> None:
        """``tail``'s last configs go to idle runners before the current search's, until it retires."""
        self.tails.append(tail)

    def retire(self, tail: Tail) -> bool:
        """``tail`` has nothing left to run; False if it was not (or no longer) handed off."""
        if tail not in self.tails:
            return False
        self.tails.remove(tail)
        return True

    def serve_tails(self) -> None:
        """Gives idle runners the configs that handed-off searches have left to run, oldest search first."""
        for tail in list(self.tails):
            tail.serve()

    def beat_tails(self) -> None:
        for tail in self.tails:
            tail.beat()

    def abandon_tails(self) -> None:
        """The run is stopping: the handed-off searches' unfinished trials are left for a later run."""
        for tail in list(self.tails):
            tail.abandon(replace_busy=False)

    def idle_runners(self, loaded: tuple | None = None) -> list[Worker]:
        """The idle runners, those that have ``loaded`` (problem, seed) set up first; waits for one if none is."""
        while True:
            idle = [w for w in self.runners if not w.busy]
            if idle:
                return sorted(idle, key=lambda w: w.loaded != loaded)
            self._wait_background()  # every runner serves a background request

    def drain(self) -> None:
        """Waits for every background request to be answered, and for the handed-off searches to finish."""
        while self.background or self.tails:
            self.serve_tails()
            if self.background:
                self._wait_background()
            elif self.tails:  # held back by a trial elsewhere still writing its config (Search.next_ready)
                time.sleep(CHOOSING_POLL_S)

    def _wait_background(self) -> None:
        """Waits for replies when only background requests are out: any other reply would have no one to take it."""
        for worker, event in self.wait(timeout=60.0):
            raise RuntimeError(f"{worker.name} replied to no one: {event}")

    def cancel_background(self) -> None:
        for worker in list(self.background):
            worker.cancel()
        self.background.clear()
        self.tails.clear()

    def wait(self, timeout: float) -> list[tuple[Worker, Event]]:
        """Waits until a busy worker replies or reaches its deadline (or ``timeout``); returns what happened, less the
        replies to background requests, which go to their handlers."""
        busy = [w for w in self.workers if w.busy]
        if not busy:
            return []
        now = time.monotonic()
        soonest = min(w.deadline for w in busy)
        ready = wait_for_connections([w.conn for w in busy], max(0.0, min(timeout, soonest - now)))
        events = []
        for w in busy:
            if w.conn in ready:
                event = w.receive()
            elif time.monotonic() >= w.deadline:
                event = w.expire()
            else:
                continue
            if event is None:
                continue
            if w in self.background:
                self.background.pop(w)(event)
            else:
                events.append((w, event))
        return events


def visible_devices(n: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES values for n workers, one GPU each, from what this process may see: the variable's own
    list where it is set (without importing torch), else torch's device count."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        ids = [d.strip() for d in listed.split(",") if d.strip()]
    else:
        require_gpu()
        import torch
        ids = [str(i) for i in range(torch.cuda.device_count())]
    if n > len(ids):
        raise ValueError(f"--workers {n} needs {n} GPUs, but {len(ids)} are visible")
    return ids[:n]


def require_gpu() -> None:
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError(NO_GPU)

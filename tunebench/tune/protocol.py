"""What the tuner's process and its worker processes exchange: the requests the parent sends (picklable; the worker
imports the kernel module by its registry path), the Outcome of one trial, and the Event the parent makes of a reply.

Both sides import this module and neither imports the other, so it holds no torch and no process handling.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..shapes import Problem


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


@dataclass(frozen=True)
class Identify:
    """Read the device the worker sees (the parent never initialises a CUDA context)."""


@dataclass(frozen=True)
class Setup:
    """Build the problem's inputs (and, in a runner, its references) once, ahead of its trials. ``module``: the
    kernel module's path, for a kernel that builds its own inputs (tunebench.kernel_protocol)."""
    problem: Problem
    seed: int
    module: str = ""


@dataclass(frozen=True)
class _Kernel:
    """A request about one kernel on one problem: the worker imports the kernel module by its registry path."""
    module: str
    problem: Problem
    seed: int


@dataclass(frozen=True)
class _OneConfig(_Kernel):
    """A request about one config; the worker tells the kinds apart by their class."""
    config: dict = field(hash=False)


@dataclass(frozen=True)
class Run(_OneConfig):
    """Compile (or load from the cache), check and time the config."""


@dataclass(frozen=True)
class Compile(_OneConfig):
    """Compile the config into Triton's on-disk cache without launching it."""


@dataclass(frozen=True)
class Retime(_Kernel):
    """Time the finalists against each other in interleaved rounds. ``peer``: (module path, config) of the kernel
    this one replaces where it runs (flash_v2 for flash_v3), timed in the same rounds on the same inputs, after a
    trial's checks: its round medians come last in the reply (none if it failed them)."""
    configs: list = field(hash=False)
    rounds: int = 3
    first: int = 0      # the number of the first round (rounds shared among runners)
    peer: tuple = field(default=(), hash=False)


@dataclass
class Event:
    """What became of a request: kind is "ok" (value), "error" (message: the request failed in the worker, e.g. its
    problem could not be set up), "died" (the process exited) or "timeout" (killed at its deadline)."""
    kind: str
    value: object = None
    message: str = ""

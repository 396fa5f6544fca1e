"""A timeline of a tuning run, for finding where its wall time goes (bench/trace_summary.py reads it).

With $TUNEBENCH_TRACE=FILE set, the tuner's process appends one JSON line per event to FILE: each worker request sent
and finished (worker, request type, what came of it), the spans of the parent's own work (asking Optuna, writing a
result, reading the study) and the run's milestones (workers ready, each problem's search and confirmation). Without
it every call here returns at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

_path = os.environ.get("TUNEBENCH_TRACE") or None
_file = None
_process_line = True    # the first event is preceded by the process's start time: the run's, not a worker's


def in_worker() -> None:
    """This process is a worker of the run: its events join the parent's file (appended a line at a time) without a
    start-of-process line of their own. The file is the one $TUNEBENCH_TRACE names now: a worker forked from a
    forkserver may hold this module as imported there, before the parent set it."""
    global _process_line, _path, _file
    _process_line, _path, _file = False, os.environ.get("TUNEBENCH_TRACE") or None, None


def event(kind: str, **fields) -> None:
    """One line: {"t": seconds (time.time), "kind": kind, **fields}."""
    global _file
    if _path is None:
        return
    if _file is None:
        try:
            _file = open(_path, "a", buffering=1)  # line-buffered: a killed run keeps what it wrote
        except OSError as e:
            raise RuntimeError(f"$TUNEBENCH_TRACE names a file that cannot be written: {_path} ({e})") from None
        started = process_started() if _process_line else None
        if started is not None:  # what came before the first event: starting Python, imports
            _file.write(json.dumps({"t": round(started, 6), "kind": "process", "pid": os.getpid()}) + "\n")
    _file.write(json.dumps({"t": round(time.time(), 6), "kind": kind, **fields}, default=str) + "\n")


def process_started() -> float | None:
    """When this process started, in time.time() seconds (to 10 ms), from /proc; None where there is none."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def span(kind: str, **fields):
    """An event with the duration ("s") of the block, written when it ends."""
    if _path is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        event(kind, s=round(time.perf_counter() - start, 6), **fields)


@contextlib.contextmanager
def writing_to(path: str):
    """Traces this process to ``path`` for the block, and the worker processes started in it ($TUNEBENCH_TRACE is
    set for them); then as before. For measurements that read their own trace (tunebench.tune.simulate)."""
    global _path, _file, _process_line
    saved = _path, _file, _process_line, os.environ.get("TUNEBENCH_TRACE")
    _path, _file, _process_line = str(path), None, True
    os.environ["TUNEBENCH_TRACE"] = str(path)
    try:
        yield
    finally:
        if _file is not None:
            _file.close()
        _path, _file, _process_line, before = saved
        if before is None:
            os.environ.pop("TUNEBENCH_TRACE", None)
        else:
            os.environ["TUNEBENCH_TRACE"] = before

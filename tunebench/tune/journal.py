"""Optuna's studies in an append-only journal file: the default storage beside an SQLite results database.

Optuna's JournalStorage keeps the studies in memory and writes every change as one operation (a JSON object) to a
log; AppendLog is that log, a file of one JSON line per operation, in the format of Optuna's own JournalFileBackend
(optuna-dashboard and JournalFileBackend read it). An operation costs ~25-40 us (one appended line, then reading the
lines others appended) where Optuna's RDB storage on SQLite committed a transaction: the parent's time per ask in
bench/fleet_sim.py fell from 16-30 ms to 1.5-3.7 ms (BENCHMARKS.md, "Simulated fleet").

- Sharing: processes of one host share a journal on a local filesystem. Each append is one write() on an O_APPEND
  descriptor under an exclusive flock(): appends never interleave, and the kernel releases the lock of a killed
  process. Not for a network filesystem (NFS locks and appends are not that reliable): give several hosts a
  PostgreSQL --storage.
- Durability: a line is in the kernel's page cache once write() returns, so a killed process loses nothing it
  wrote. There is no fsync: a power loss or kernel crash may lose the last lines (as SQLite's WAL mode with
  synchronous=NORMAL, which the results store uses, may lose its last transactions); a resumed run then runs
  those trials again.
- A torn line: a process killed inside write() can leave a last line without its newline. Readers never parse a
  line before its newline is there; the next append (or opening the file) cuts the torn line off with a warning,
  under the lock, so no one's line is glued to it. A bad line followed by others is an error naming the file and
  the line: it is not a torn write, and replaying past it would give every process a different study.
- Heartbeats: JournalStorage has none. JournalStudies records them as a trial's system attribute "heartbeat" (the
  writer's clock: one host), so that Optuna's stale-trial check (fail_stale_trials) and SharedStudy's adoption of
  orphaned trials work as on the RDB storage.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
import warnings
import weakref
from typing import Any, Callable

from optuna.storages import JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import TrialState

from .study import SQL_JOURNAL

READ_CHUNK = 1 << 20


class JournalError(RuntimeError):
    """The journal cannot be read: a line (a row) in it is not an operation, or a table's row is missing (the message
    names the file and line, or the table and row)."""


class JournalWarning(UserWarning):
    """A torn last line (a process killed while writing it) was cut off the journal."""


def parse_operation(raw: bytes | str, where: str, remedy: str) -> dict[str, Any]:
    """One journal operation (a JSON object with an op_code), or a JournalError naming ``where`` and ``remedy``."""
    try:
        log = json.loads(raw)
    except ValueError as e:
        log = e
    if not isinstance(log, dict) or "op_code" not in log:
        raise JournalError(f"{where}: not an Optuna journal operation ({raw[:80]!r}): {remedy}")
    return log


class AppendLog(BaseJournalBackend):
    """Optuna's journal backend on one file: appends under flock in one write each, reads of new lines only."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        weakref.finalize(self, os.close, self.fd)
        self.offset = 0         # bytes read and parsed: every line before it is complete
        self.number = 0         # operations read so far (the next one's log number)
        with self._locked():
            self._cut_torn_tail()

    def __getstate__(self) -> dict:
        return {"path": self.path}  # a descriptor does not travel: the copy reopens the file and reads it anew

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._open()

    # -- reading

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        """The operations numbered log_number_from and on, as far as complete lines go. JournalStorage asks for the
        next ones each time; an earlier number (a fresh replay) reads the file again from its start."""
        if log_number_from < self.number:
            self.offset, self.number = 0, 0
        logs = []
        for line in self._new_lines():
            if self.number >= log_number_from:
                logs.append(self._parse(line))
            self.number += 1
        return logs

    def _new_lines(self) -> list[bytes]:
        """The complete lines after ``offset`` (which moves past them). A last line without its newline is left for
        a later read: it is being written, or torn (the next append cuts it off)."""
        data = b""
        while True:
            chunk = os.pread(self.fd, READ_CHUNK, self.offset + len(data))
            data += chunk
            if len(chunk) < READ_CHUNK:
                break
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].split(b"\n")[:-1]

    def _parse(self, line: bytes) -> dict[str, Any]:
        return parse_operation(line, f"{self.path}, line {self.number + 1}",
                               "the file is corrupt; move it away to start the studies anew")

    # -- writing

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Appends the operations in one write, under the lock. A short write is undone (the file is cut back),
        so no torn line is left for the next append to find."""
        data = b"".join(json.dumps(log, separators=(",", ":")).encode() + b"\n" for log in logs)
        with self._locked():
            size = self._cut_torn_tail()
            try:
                written = os.write(self.fd, data)
            except BaseException:
                os.ftruncate(self.fd, size)
                raise
            if written != len(data):
                os.ftruncate(self.fd, size)
                raise OSError(f"{self.path}: only {written} of {len(data)} bytes written (is the disk full?)")

    def _locked(self):
        return _Flock(self.fd)

    def _cut_torn_tail(self) -> int:
        """Under the lock (no append is under way): cuts off a last line that has no newline, a process having been
        killed while writing it. Returns the file's size after."""
        size = os.fstat(self.fd).st_size
        if size == 0 or os.pread(self.fd, 1, size - 1) == b"\n":
            return size
        start = size
        while start > 0:
            begin = max(0, start - READ_CHUNK)
            newline = os.pread(self.fd, start - begin, begin).rfind(b"\n")
            if newline >= 0:
                start = begin + newline + 1
                break
            start = begin
        warnings.warn(f"tunebench: cut a torn last line ({size - start} bytes, a process killed while writing it) "
                      f"off the Optuna journal {self.path}", JournalWarning, stacklevel=3)
        os.ftruncate(self.fd, start)
        return start


class _Flock:
    """An exclusive flock() on a descriptor for the length of a with block."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class JournalStudies(JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage on an AppendLog (or a table, journal_sql.SqlLog), with heartbeats: a trial's system
    attribute "heartbeat" holds the time of its last one, and a RUNNING trial whose heartbeat is older than
    ``grace_s`` is stale."""

    def __init__(self, log: str | os.PathLike | BaseJournalBackend, heartbeat_s: int | None = None,
                 grace_s: int | None = None, stale_callback: Callable | None = None):
        """``log``: a journal file's path (an AppendLog), or another backend (journal_sql.SqlLog: a table)."""
        if not isinstance(log, BaseJournalBackend):
            log = AppendLog(log)
        self.path = getattr(log, "path", None)      # describe_storage names the file, else the URL
        self.url = None if self.path else SQL_JOURNAL + log.url
        self.log = log
        self.heartbeat_s, self.grace_s, self.stale_callback = heartbeat_s, grace_s, stale_callback
        super().__init__(log)

    def record_heartbeat(self, trial_id: int) -> None:
        """A heartbeat for a trial that is still running (a finished one needs none, and cannot take one)."""
        from optuna.exceptions import UpdateFinishedTrialError
        if self.get_trial(trial_id).state.is_finished():
            return
        try:
            self.set_trial_system_attr(trial_id, "heartbeat", time.time())
        except UpdateFinishedTrialError:
            pass  # finished by its owner since

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        cutoff = time.time() - (self.grace_s if self.grace_s is not None else 2 * (self.heartbeat_s or 0))
        return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if t.system_attrs.get("heartbeat", cutoff) < cutoff]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_s

    def get_heartbeat_stale_trial_callback(self) -> Callable | None:
        return self.stale_callback

"""Optuna's studies as a journal in a PostgreSQL table, for hosts that share them: `--storage journal:URL`.

On Optuna's RDB storage the parent's loop spends ~60 ms per trial on a loopback PostgreSQL server (cProfile of
bench/fleet_sim.py, 4 simulated workers: each suggested parameter, attribute and state change is a committed
transaction, and reading another process's trials re-reads them), so one process could not feed 8 GPUs of short
trials through it. Optuna's JournalStorage instead keeps the studies in memory and writes each change as one
operation to a log that every process replays in one order (tunebench.tune.journal: the same on a local file).
SqlLog is that log in a table:

- An append is one transaction: it takes a transaction-level advisory lock, numbers its operations after the last
  one (``seq``, from 0, no gaps) and commits, which releases the lock. So operations are numbered in commit order,
  and a reader's snapshot always holds a whole prefix of the log: no process can read operation n + 1 before n.
- A read fetches the operations from a number on (the primary key's range).
- The table (``tunebench_optuna_journal``) is created on first use, under the same lock.
- Heartbeats (tunebench.tune.journal.JournalStudies) are the writer's clock: the hosts' clocks must agree to well
  within the grace period (120 s), as NTP keeps them.
- optuna-dashboard does not read this table; Optuna's RDB storage (`--storage URL` without `journal:`) is the one it
  reads. Studies in one are not seen by the other.
"""
from __future__ import annotations

import json
from typing import Any

from optuna.storages.journal import BaseJournalBackend

from .journal import JournalError, parse_operation

TABLE = "tunebench_optuna_journal"
LOCK_KEY = 0x7475_6E65_6A6F_7572   # "tunejour": pg_advisory_xact_lock's bigint key


class SqlLog(BaseJournalBackend):
    """Optuna's journal backend on a PostgreSQL table: appends numbered under an advisory lock, reads by number.

    It holds one connection in autocommit mode: an append is one call of a function that takes the lock, numbers and
    inserts the operations (its statements see what was committed before the lock was granted), and a read one
    SELECT; a round trip each. (A pooled connection per operation, pinged at checkout, and the lock, the number and
    the insert as separate statements cost ~0.9 ms per append and ~0.5 ms per read on a loopback server, and made
    the journal only 1.8x faster than Optuna's tables; Optuna appends ~12 operations per trial and reads before each.)
    A read whose connection was lost connects again once; an append does not retry (it may have been committed)."""

    def __init__(self, url: str):
        self.url = url
        self._connect()

    def _connect(self) -> None:
        from sqlalchemy import create_engine
        from ..store.engine import connect_args
        from sqlalchemy.pool import SingletonThreadPool
        # One connection, kept: this log holds it for its life.
        self.engine = create_engine(self.url, connect_args=connect_args(self.url), poolclass=SingletonThreadPool)
        if self.engine.dialect.name != "postgresql":
            raise ValueError(f"a journal: --storage needs a PostgreSQL URL (its appends take an advisory lock), got "
                             f"the {self.engine.dialect.name} dialect")
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({LOCK_KEY})")
            conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {TABLE} (seq BIGINT PRIMARY KEY, op TEXT NOT NULL)")
            conn.exec_driver_sql(APPEND_FUNCTION)
        self._hold()

    def _hold(self) -> None:
        self.conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def __getstate__(self) -> dict:
        return {"url": self.url}    # a connection does not travel: the copy connects anew

    def __setstate__(self, state: dict) -> None:
        self.url = state["url"]
        self._connect()

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        """The operations numbered log_number_from and on, committed so far, in order. A gap in the numbers or a
        row that is not an operation (the table edited by hand) is a JournalError naming the row: replaying past it
        would give every process a different study."""
        from sqlalchemy.exc import DBAPIError
        query = f"SELECT seq, op FROM {TABLE} WHERE seq >= %(start)s ORDER BY seq"
        try:
            rows = self.conn.exec_driver_sql(query, {"start": log_number_from}).all()
        except DBAPIError as e:
            if not e.connection_invalidated:
                raise
            self._hold()
            rows = self.conn.exec_driver_sql(query, {"start": log_number_from}).all()
        return [self._parse(log_number_from + i, seq, op) for i, (seq, op) in enumerate(rows)]

    @staticmethod
    def _parse(expected: int, seq: int, op: str) -> dict[str, Any]:
        if seq != expected:
            raise JournalError(f"{TABLE}: operation {expected} is missing (the next row is numbered {seq}): the "
                               f"table was edited; drop it to start the studies anew")
        return parse_operation(op, f"{TABLE}, row {seq}", "the table was edited; drop it to start the studies anew")

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Appends the operations in one call, numbered after the last one under the lock."""
        if logs:
            self.conn.exec_driver_sql(f"SELECT {TABLE}_append(%(ops)s)",
                                      {"ops": [json.dumps(log, separators=(",", ":")) for log in logs]})


APPEND_FUNCTION = f"""
CREATE OR REPLACE FUNCTION {TABLE}_append(ops TEXT[]) RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE
    start BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock({LOCK_KEY});
    SELECT COALESCE(MAX(seq) + 1, 0) INTO start FROM {TABLE};
    INSERT INTO {TABLE} (seq, op) SELECT start + n - 1, op FROM unnest(ops) WITH ORDINALITY AS u(op, n);
END
$$"""

"""How many GPUs one tuner process keeps busy: the real parent loop (tunebench.tune: Search, Fleet, confirm), Optuna
storage and results store, on a fleet of 1, 2, 4 and 8 simulated workers that sleep for a trial's duration
(tunebench.tune.simulate). CPU only, no GPU: the figures measure the parent's own work per trial, not a kernel.

    python3 bench/fleet_sim.py                        # 20 ms trials, 2 flash_v2 problems of the default suite
    python3 bench/fleet_sim.py --recorded results.db  # durations drawn from the store's recorded ok trials
    python3 bench/fleet_sim.py --workers 8 --trial-ms 5 --problems 4 --trials 48 --sampler grid

Per fleet size it prints: the wall time (start-up included), the start-up (workers spawned to ready), the search
window (first simulated trial's start to the last one's end), the runners' busy share of that window (trials and
re-timings; the issue's goal is >= 90% at 8 workers), trials per second and the speedup over one worker's, the
parent's Optuna asks per second, asks per trial run (the others were pruned by keep() or repeats) and its time per
ask, and trials run twice (must be 0). --ask-batch sets the configs asked per turn of the loop
(tunebench.tune.search.ASK_BATCH), to measure batching; --no-queue sends a runner its next config only once it has
replied (by default the next one waits behind the trial running: Search.queue_runs); --profile N prints the parent's
N costliest calls (cProfile, cumulative) per fleet size.

--storage URL (a PostgreSQL server; its user needs CREATEDB) keeps the studies there, and --db URL the results (the
same URL: one database for both), each run in a scratch database of its own (tunebench.tune.simulate.scratch_database);
by default both are SQLite files in a temporary folder. --hosts H (needs --storage) runs, per fleet size W, one host
(parent process) with W workers and then H hosts with W workers each at once, sharing each problem's study
(tunebench.tune.simulate.simulate_hosts):

    python3 bench/fleet_sim.py --hosts 2 --workers 4 --storage postgresql+psycopg://u:p@host/db --db SAME_URL

It prints per host and for all hosts together: the wall time from the start line (every host's fleet up) to the
host's last result, the parent processes' CPU time in it (as a share of one core: 100% is a parent that never
waits), the search window, the busy share, trials/s and the speedup over one host with the same workers,
asks/s and ms per ask, trials run twice (all hosts' together: must be 0), the trials run per problem (the budget is
shared: --trials, not H times it) and the winners each host wrote (one per problem in all).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import pathlib
import pstats
import sys
import tempfile
import time


def recorded_durations(db: str) -> tuple[float, ...]:
    """Every recorded ok trial's duration (started to result written: the GPU's work plus the parent's latency)."""
    from tunebench.store import Store
    with Store(db, readonly=True) as store:
        out = tuple((t.finished_at - t.started_at).total_seconds() for t in store.trials()
                    if t.status == "ok" and t.started_at and t.finished_at and t.finished_at >= t.started_at)
    if not out:
        raise SystemExit(f"{db} holds no ok trial with start and end times")
    return out


@contextlib.contextmanager
def options_for(workers: int, args, folder: pathlib.Path):
    """The run's options, its results store and Optuna storage in scratch databases on the --db and --storage
    servers (one if the URLs are the same), else in SQLite files in ``folder``."""
    from tunebench.tune.options import TuneOptions
    from tunebench.tune.simulate import scratch_database
    with contextlib.ExitStack() as stack:
        storage = stack.enter_context(scratch_database(args.storage)) if args.storage else None
        db = (str(folder / "results.db") if args.db is None else storage if args.db == args.storage else
              stack.enter_context(scratch_database(args.db)))
        if storage and args.journal:
            from tunebench.tune.study import SQL_JOURNAL
            storage = SQL_JOURNAL + storage  # Optuna's journal in a table of the scratch database (journal_sql)
        yield TuneOptions(interpret=True, db=db, storage=storage, workers=workers, trials=args.trials,
                          sampler=args.sampler, compile_workers=args.compile_workers, queue_runs=not args.no_queue)


def problems_of(args) -> list:
    from tunebench.shapes import suite
    return [p for p in suite("default") if p.kernel == args.kernel][:args.problems]


def figures(use) -> dict:
    """A Utilisation's figures per search window."""
    return {"window_s": use.window_s, "busy": use.mean_busy, "trials": len(use.runs),
            "trials_per_s": len(use.runs) / use.window_s, "asks_per_s": use.asks / use.window_s,
            "ms_per_ask": 1e3 * use.ask_s / max(1, use.asks), "duplicates": use.duplicates}


def run(workers: int, args, sim, folder: pathlib.Path) -> dict:
    """One tuner process (this one) on a fleet of ``workers``."""
    from tunebench.tune.simulate import read_trace, simulate
    profile = cProfile.Profile() if args.profile else None
    with options_for(workers, args, folder) as options:
        start = time.perf_counter()
        with profile or contextlib.nullcontext():
            _, use = simulate(problems_of(args), options, sim, folder / "trace.jsonl", err=io.StringIO())
        wall = time.perf_counter() - start
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)
    first = {}
    for e in read_trace(folder / "trace.jsonl"):
        first.setdefault(e["kind"], e["t"])
    return {"workers": workers, "wall_s": wall, "startup_s": first["fleet_ready"] - first["spawn"], **figures(use)}


def run_hosts(hosts: int, workers: int, args, sim, folder: pathlib.Path) -> list[dict]:
    """``hosts`` tuner processes with ``workers`` each on one storage: a row per host, then one for all of them."""
    from tunebench.tune.simulate import simulate_hosts
    problems = problems_of(args)
    with options_for(workers, args, folder) as options:
        runs, use = simulate_hosts(hosts, problems, options, sim, folder)

    def row(host: str, wall_s: float, cpu_s: float, results: list, u) -> dict:
        counts = collections.Counter(problem for problem, _ in u.runs)
        return {"host": host, "wall_s": wall_s, "cpu": cpu_s / wall_s, "written": sum(r.written for r in results),
                "per_problem": "/".join(str(counts[p.label()]) for p in problems), **figures(u)}

    return [row(str(i), r.wall_s, r.cpu_s, r.results, r.use) for i, r in enumerate(runs)] + [
        row("all", max(r.wall_s for r in runs), sum(r.cpu_s for r in runs), sum((r.results for r in runs), []), use)]


def print_fleets(args, sim) -> None:
    print(f"{'workers':>7} {'wall s':>7} {'start s':>7} {'window s':>8} {'busy':>6} {'trials/s':>8} {'x1':>5} "
          f"{'asks/s':>7} {'asks/trial':>10} {'ms/ask':>7} {'dups':>4}")
    base = None
    for n in [int(x) for x in args.workers.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            r = run(n, args, sim, pathlib.Path(folder))
        if n == 1:
            base = r["trials_per_s"]
        speedup = f"{r['trials_per_s'] / base:5.2f}" if base else "    -"
        print(f"{n:7d} {r['wall_s']:7.2f} {r['startup_s']:7.2f} {r['window_s']:8.2f} {r['busy']:6.1%} "
              f"{r['trials_per_s']:8.1f} {speedup} {r['asks_per_s']:7.1f} {r['asks_per_s'] / r['trials_per_s']:10.2f} "
              f"{r['ms_per_ask']:7.2f} "
              f"{r['duplicates']:4d}")
        sys.stdout.flush()


def print_hosts(args, sim) -> None:
    print(f"{'hosts x workers':>15} {'host':>4} {'wall s':>7} {'cpu':>5} {'window s':>8} {'busy':>6} {'trials/s':>8} "
          f"{'x1 host':>7} {'asks/s':>7} {'ms/ask':>7} {'dups':>4} {'trials/problem':>14} {'winners':>7}")
    for n in [int(x) for x in args.workers.split(",")]:
        base = None
        for hosts in (1, args.hosts):
            with tempfile.TemporaryDirectory() as folder:
                rows = run_hosts(hosts, n, args, sim, pathlib.Path(folder))
            base = base or rows[-1]["trials_per_s"]
            for r in rows if hosts > 1 else rows[-1:]:
                print(f"{f'{hosts} x {n}':>15} {r['host']:>4} {r['wall_s']:7.2f} {r['cpu']:5.0%} {r['window_s']:8.2f} "
                      f"{r['busy']:6.1%} {r['trials_per_s']:8.1f} {r['trials_per_s'] / base:7.2f} "
                      f"{r['asks_per_s']:7.1f} {r['ms_per_ask']:7.2f} {r['duplicates']:4d} {r['per_problem']:>14} "
                      f"{r['written']:7d}")
            sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8", help="fleet sizes, comma-separated")
    parser.add_argument("--trial-ms", type=float, default=20.0, help="a fixed trial duration")
    parser.add_argument("--recorded", metavar="DB", help="draw durations from this results database's ok trials")
    parser.add_argument("--problems", type=int, default=2)
    parser.add_argument("--kernel", default="flash_v2")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--sampler", default="tpe", choices=["tpe", "grid"])
    parser.add_argument("--compile-workers", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the parent's N costliest calls")
    parser.add_argument("--ask-batch", type=int, help="configs asked per turn of the loop (default: the tuner's)")
    parser.add_argument("--no-queue", action="store_true", help="send a runner its next config only once it has "
                        "replied (TuneOptions.queue_runs off), to measure what queueing it behind the trial gains")
    parser.add_argument("--storage", metavar="URL", help="a PostgreSQL server for the studies (a scratch database "
                                                         "per run; its user needs CREATEDB)")
    parser.add_argument("--db", metavar="URL", help="a PostgreSQL server for the results (the --storage URL: the "
                                                    "same scratch database)")
    parser.add_argument("--journal", action="store_true", help="keep the studies as Optuna's journal in a table of "
                        "the --storage database (tune --storage journal:URL) rather than in Optuna's RDB tables")
    parser.add_argument("--hosts", type=int, default=1, help="tuner processes sharing the studies (needs --storage)")
    args = parser.parse_args()
    if args.hosts > 1 and not args.storage:
        parser.error("--hosts shares the studies through a server: give --storage URL")
    if args.journal and not args.storage:
        parser.error("--journal keeps the studies in a table of the --storage database: give --storage URL")
    if args.db and not args.storage:
        parser.error("--db URL (a server) needs --storage URL: only an SQLite results file gets studies beside it")
    if args.hosts > 1 and (args.profile or args.ask_batch is not None):
        parser.error("--profile and --ask-batch act on this process: under --hosts the hosts' loops run in others")
    from tunebench.tune import search
    if args.ask_batch is not None:
        search.ASK_BATCH = args.ask_batch
    from tunebench.tune.simulate import Simulation
    durations = recorded_durations(args.recorded) if args.recorded else (args.trial_ms / 1e3,)
    sim = Simulation(durations)
    mean_ms = 1e3 * sum(durations) / len(durations)
    where = f", studies on {args.storage.rsplit('@', 1)[-1]}" if args.storage else ""
    print(f"simulated fleet (CPU only): {args.problems} {args.kernel} problems x {args.trials} trials, "
          f"{args.sampler}, trials of {mean_ms:.1f} ms on average ({len(durations)} durations), "
          f"{search.ASK_BATCH} asks per turn, {'no config' if args.no_queue else 'a config'} queued behind each "
          f"runner's trial{where}")
    (print_hosts if args.hosts > 1 else print_fleets)(args, sim)


if __name__ == "__main__":
    main()

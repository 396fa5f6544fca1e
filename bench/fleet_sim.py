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
(tunebench.tune.search.ASK_BATCH), to measure batching; --profile N prints the parent's N costliest calls
(cProfile, cumulative) per fleet size.
"""
from __future__ import annotations

import argparse
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


def run(workers: int, args, sim, folder: pathlib.Path) -> dict:
    from tunebench.shapes import suite
    from tunebench.tune.options import TuneOptions
    from tunebench.tune.simulate import read_trace, simulate
    problems = [p for p in suite("default") if p.kernel == args.kernel][:args.problems]
    options = TuneOptions(interpret=True, db=str(folder / "results.db"), workers=workers, trials=args.trials,
                          sampler=args.sampler, compile_workers=args.compile_workers)
    profile = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    with profile or contextlib.nullcontext():
        _, use = simulate(problems, options, sim, folder / "trace.jsonl", err=io.StringIO())
    wall = time.perf_counter() - start
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)
    first = {}
    for e in read_trace(folder / "trace.jsonl"):
        first.setdefault(e["kind"], e["t"])
    return {"workers": workers, "wall_s": wall, "startup_s": first["fleet_ready"] - first["spawn"],
            "window_s": use.window_s, "busy": use.mean_busy, "trials": len(use.runs),
            "trials_per_s": len(use.runs) / use.window_s, "asks_per_s": use.asks / use.window_s,
            "ms_per_ask": 1e3 * use.ask_s / max(1, use.asks), "duplicates": use.duplicates}


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
    args = parser.parse_args()
    from tunebench.tune import search
    if args.ask_batch is not None:
        search.ASK_BATCH = args.ask_batch
    from tunebench.tune.simulate import Simulation
    durations = recorded_durations(args.recorded) if args.recorded else (args.trial_ms / 1e3,)
    sim = Simulation(durations)
    mean_ms = 1e3 * sum(durations) / len(durations)
    print(f"simulated fleet (CPU only): {args.problems} {args.kernel} problems x {args.trials} trials, "
          f"{args.sampler}, trials of {mean_ms:.1f} ms on average ({len(durations)} durations), "
          f"{search.ASK_BATCH} asks per turn")
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


if __name__ == "__main__":
    main()

"""How long real worker processes take to start: a Fleet of N `--interpret` runners (tunebench.tune.pool), from
Fleet.start to every worker ready, and then the respawn of one worker killed with SIGKILL (kill to ready again, as
the tuner replaces a worker that died). CPU only: each worker imports torch and triton; nothing runs a kernel.

Each measurement runs in a fresh Python process, as `tunebench tune` does: a forkserver (tunebench.tune.startup)
lives as long as its parent, and only the first fleet of a process pays for starting it.

    taskset -c 0,1 python3 bench/startup.py                       # 1, 2, 4, 8 workers; forkserver and spawn
    python3 bench/startup.py --workers 8 --methods spawn --repeat 5
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time


def measure(workers: int) -> dict:
    """In this process: start a fleet of ``workers`` runners, then kill and respawn its first one (seconds)."""
    from tunebench.tune.options import TuneOptions
    from tunebench.tune.pool import Fleet
    fleet = Fleet(TuneOptions(interpret=True, workers=workers))
    start = time.perf_counter()
    with fleet:
        ready = time.perf_counter() - start
        victim = fleet.runners[0]
        os.kill(victim.process.pid, signal.SIGKILL)
        start = time.perf_counter()
        victim.restart()
        respawn = time.perf_counter() - start
    return {"ready_s": ready, "respawn_s": respawn}


def in_fresh_process(workers: int, method: str) -> dict:
    env = dict(os.environ, TUNEBENCH_START_METHOD=method)
    done = subprocess.run([sys.executable, "-P", __file__, "--one", str(workers)], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"the measurement failed ({method}, {workers} workers):\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8", help="fleet sizes, comma-separated")
    parser.add_argument("--methods", default="forkserver,spawn", help="start methods (tunebench.tune.startup)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per figure; the median is printed")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the measurement itself, in a fresh process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    methods = args.methods.split(",")
    print(f"real --interpret workers, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), median of "
          f"{args.repeat} fresh processes per figure, the methods interleaved")
    print(f"{'method':>10} {'workers':>7} {'ready s':>8} {'respawn s':>9}   (each run: ready / respawn)")
    for n in [int(x) for x in args.workers.split(",")]:
        runs = {m: [] for m in methods}
        for _ in range(args.repeat):  # interleaved: a machine whose load changes affects every method alike
            for m in methods:
                runs[m].append(in_fresh_process(n, m))
        for m in methods:
            ready = statistics.median(r["ready_s"] for r in runs[m])
            respawn = statistics.median(r["respawn_s"] for r in runs[m])
            each = " ".join(f"{r['ready_s']:.2f}/{r['respawn_s']:.2f}" for r in runs[m])
            print(f"{m:>10} {n:7d} {ready:8.2f} {respawn:9.2f}   {each}", flush=True)

if __name__ == "__main__":
    main()

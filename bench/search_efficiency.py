"""Search efficiency: how often TPE, given a quarter of the grid's trials, finds a config as fast as the exhaustive
grid's winner.

For each problem: one `--sampler grid` run (every config that keep admits), then `--sampler tpe` runs with
ceil(FRACTION x the grid's size) trials, one per seed, each into its own results database and Optuna storage (studies
are keyed by device, kernel, hash and bucket, not by sampler or seed, so sharing one would resume, not repeat). All
runs go through `tunebench.tune.run.tune` with one fleet of worker processes, started once. Then the grid's winner and every TPE
winner are re-timed head to head in one worker (interleaved rounds, as the tuner confirms winners): a (problem, seed)
is a hit when its winner is within TOLERANCE of the grid's. The gap is also reported as the grid run's own timing
of the TPE winner's config over the grid's best trial (no extra GPU time; noisier, since single trials).

Usage (GPU machine, package installed):
    python3 bench/search_efficiency.py --out DIR            # the 4 problems below, seeds 0-4
    python3 bench/search_efficiency.py --out DIR --interpret --seeds 2   # a check of the script on a CPU
Writes DIR/efficiency.md (the table) and DIR/efficiency.json; the runs' databases stay under DIR.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import statistics
import sys
import time

# Problems from the default suite with different landscapes: short and long causal prefill, non-causal, D 64, and
# FlashAttention-1 (a smaller space, one program per head).
PROBLEMS = [
    ("flash_v2", 4, 32, 8, 4096, 4096, 128, "float16", True),
    ("flash_v2", 16, 32, 8, 1024, 1024, 128, "bfloat16", True),
    ("flash_v2", 4, 16, 16, 4096, 4096, 128, "float16", False),
    ("flash_v2", 4, 32, 32, 4096, 4096, 64, "bfloat16", True),
    ("flash_v1", 4, 16, 16, 1024, 1024, 128, "float16", False),
]
INTERPRET_PROBLEMS = [
    ("flash_v1", 1, 1, 1, 40, 40, 16, "float32", False),
    ("flash_v2", 1, 2, 1, 64, 64, 32, "float16", True),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the runs' databases and the report")
    parser.add_argument("--seeds", type=int, default=5, help="TPE runs per problem (seeds 0..N-1)")
    parser.add_argument("--fraction", type=float, default=0.25, help="TPE trials as a share of the grid's size")
    parser.add_argument("--tolerance", type=float, default=0.03, help="a TPE winner within this of the grid's hits")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the head-to-head re-timing")
    parser.add_argument("--problems", type=int, default=None, help="only the first N problems of the list")
    parser.add_argument("--grids", default=None,
                        help="reuse the grid runs (pN-grid.db) of an earlier --out on the same kind of GPU")
    parser.add_argument("--interpret", action="store_true", help="check the script on a CPU (not a measurement)")
    args = parser.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

    from tunebench import registry
    from tunebench.tune import timing
    from tunebench.shapes import Problem, bucket_key
    from tunebench.store import Store
    from tunebench.tune.options import TuneOptions
    from tunebench.tune.pool import Fleet
    from tunebench.tune.progress import format_config
    from tunebench.tune.protocol import Retime
    from tunebench.tune.run import tune
    from tunebench.tune.startup import interpreting
    from tunebench.tune.study import all_configs

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = [Problem(k, b, hq, hkv, nq, nk, d, dt, causal=c)
                for k, b, hq, hkv, nq, nk, d, dt, c in (INTERPRET_PROBLEMS if args.interpret else PROBLEMS)]
    problems = problems[:args.problems] if args.problems else problems
    base = TuneOptions(interpret=args.interpret)
    rows = []
    started = time.monotonic()
    with interpreting(args.interpret), Fleet(base) as fleet:
        for index, problem in enumerate(problems):
            module = registry.kernel_module(problem.kernel)
            admitted = sum(1 for c in all_configs(module.SPACE) if module.keep(c, problem) is None)
            budget = max(1, math.ceil(args.fraction * admitted))
            tag = f"p{index}"
            print(f"\n=== {bucket_key(problem)}: grid of {admitted} configs, TPE {budget} trials x {args.seeds} seeds",
                  flush=True)
            runs = {"grid": TuneOptions(sampler="grid", seed=0, interpret=args.interpret,
                                        db=str(out / f"{tag}-grid.db"))}
            runs.update({f"tpe{s}": TuneOptions(sampler="tpe", seed=s, trials=budget, interpret=args.interpret,
                                                db=str(out / f"{tag}-tpe{s}.db")) for s in range(args.seeds)})
            winners, wall = {}, {}
            for name, options in runs.items():
                for old in out.glob(f"{tag}-{name}.*"):  # a fresh run each time: an old database would resume
                    old.unlink()
                if name == "grid" and args.grids:
                    # The grid of an earlier run on the same kind of GPU: its trials and winner, not run again.
                    for f in pathlib.Path(args.grids).glob(f"{tag}-grid.*"):
                        shutil.copy(f, out / f.name)
                    with Store(options.db, readonly=True) as store:
                        [winner] = [w for w in store.winners() if bucket_key(w.problem) == bucket_key(problem)]
                    winners[name], wall[name] = winner.config, float("nan")
                    print(f"  grid (from {args.grids}): {format_config(winner.config)} {winner.median_ms:.4f} ms",
                          flush=True)
                    continue
                t0 = time.monotonic()
                [result] = tune([problem], options, fleet=fleet)
                wall[name] = time.monotonic() - t0
                if result.config is None:
                    print(f"  {name}: no winner ({result.note})", flush=True)
                    continue
                winners[name] = result.config
                print(f"  {name}: {format_config(result.config)} {result.median_ms:.4f} ms, "
                      f"{sum(result.counts.values())} configs, {wall[name]:.0f} s", flush=True)
            if "grid" not in winners:
                continue
            # The grid run's own timing of every config it evaluated.
            with Store(runs["grid"].db, readonly=True) as store:
                grid_ms = {json.dumps(t.config, sort_keys=True): t.median_ms
                           for t in store.trials(kernel=problem.kernel) if t.status == "ok"}
            grid_best = min(grid_ms.values())
            # Head to head: the grid's winner and each distinct TPE winner, interleaved in one worker.
            distinct = []
            for config in winners.values():
                if config not in distinct:
                    distinct.append(config)
            event = fleet.runners[0].call(
                Retime(registry.KERNELS[problem.kernel], problem, 0, distinct, args.rounds),
                timeout=base.timeout * args.rounds)
            if event.kind != "ok":
                print(f"  head-to-head re-timing failed: {event.kind} {event.message}", flush=True)
                continue
            h2h = [timing.confirmed_ms(r) for r in event.value]
            grid_h2h = h2h[distinct.index(winners["grid"])]
            for name, config in winners.items():
                if name == "grid":
                    continue
                ratio = h2h[distinct.index(config)] / grid_h2h
                own = grid_ms.get(json.dumps(config, sort_keys=True))
                rows.append(dict(problem=bucket_key(problem), admitted=admitted, budget=budget, run=name,
                                 config=format_config(config), grid_config=format_config(winners["grid"]),
                                 h2h_ratio=ratio, grid_table_ratio=(own / grid_best) if own else None,
                                 hit=ratio <= 1 + args.tolerance, grid_wall_s=wall["grid"], wall_s=wall[name]))
                print(f"  {name}: head to head {ratio:.3f}x the grid winner's time "
                      f"({'hit' if ratio <= 1 + args.tolerance else 'MISS'})", flush=True)
            write_report(out, rows, args, len(problems), time.monotonic() - started)
    print("\n" + write_report(out, rows, args, len(problems), time.monotonic() - started))
    return 0 if rows else 1


def write_report(out: pathlib.Path, rows: list[dict], args, n_problems: int, total: float) -> str:
    """DIR/efficiency.md and .json from the rows so far (written after each problem: a cut-off run keeps them)."""
    hits = sum(r["hit"] for r in rows)
    lines = [f"# Search efficiency: TPE at {args.fraction:.0%} of the grid vs the exhaustive grid", "",
             f"{'CPU interpreter: a check of the script, not a measurement' if args.interpret else 'GPU'}; "
             f"{n_problems} problems x {args.seeds} seeds; hit = TPE winner within {args.tolerance:.0%} of the "
             f"grid winner, re-timed head to head ({args.rounds} interleaved rounds); total {total:.0f} s.", "",
             "| problem | grid size | TPE trials | seed | TPE winner | grid winner | h2h time ratio | "
             "ratio by grid's trial timing | hit | grid run s | TPE run s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table = f"{r['grid_table_ratio']:.3f}" if r["grid_table_ratio"] else "-"
        lines.append(f"| {r['problem']} | {r['admitted']} | {r['budget']} | {r['run'][3:]} | {r['config']} | "
                     f"{r['grid_config']} | {r['h2h_ratio']:.3f} | {table} | {'yes' if r['hit'] else 'no'} | "
                     f"{r['grid_wall_s']:.0f} | {r['wall_s']:.0f} |".replace("| nan |", "| - |"))
    if rows:
        ratios = [r["h2h_ratio"] for r in rows]
        lines += ["", f"**{hits} of {len(rows)} (problem, seed) pairs hit ({hits / len(rows):.0%}; goal >= 90%).** "
                  f"Head-to-head ratio median {statistics.median(ratios):.3f}, worst {max(ratios):.3f}. "
                  f"TPE used {rows[0]['budget']}/{rows[0]['admitted']} of the first problem's grid; wall time per "
                  f"TPE run median {statistics.median(r['wall_s'] for r in rows):.0f} s"
                  + (" (grids reused from an earlier run)." if args.grids else
                     f" vs grid {statistics.median({r['problem']: r['grid_wall_s'] for r in rows}.values()):.0f} s.")]
    report = "\n".join(lines)
    (out / "efficiency.md").write_text(report + "\n")
    (out / "efficiency.json").write_text(json.dumps(rows, indent=1))
    return report


if __name__ == "__main__":
    sys.exit(main())

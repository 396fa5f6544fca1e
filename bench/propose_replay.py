"""TPE's search replayed on recorded landscapes (CPU, offline, no GPU): does queuing TPE's random start among the
configs keep() admits (tunebench.tune.enqueue.random_start) find configs as fast as TPE's own random start did?

A landscape is one bucket of a results database: the median_ms of each config with an ok trial (buckets tuned with
`--sampler grid` hold a uniform draw of the configs keep() admitted on that GPU, 24 of ~180-220 for flash_v2). Two
ways to make a whole landscape of it (--space):
- ``recorded``: only the recorded configs are admitted; every other config reads as one keep() rejects (so ~93% of
  SPACE is rejected, against ~35-45% on the GPU: TPE's own random start wastes more asks than it does there).
- ``imputed``: keep() as on an sm90 GPU decides what is admitted (TMA supported, 227 KiB of shared memory); an
  admitted config not recorded takes the mean time of the recorded configs nearest to it (fewest differing
  parameters). The best of the landscape is still the best recorded.
Per bucket, budget and seed, one search with the tuner's sampler (study.make_sampler, the same budget and --seed)
runs sequentially, as Search does with one runner, a repeat told the earlier result, a rejected config told pruned,
until the budget of evaluated configs or the tuner's ask limit. DEFAULT is queued first, then (the start):
- ``own``: TPE's own random start, tpe_startup(budget) trials drawn over all of SPACE, then TPE (the tuner before
  this replay was written);
- ``queued``: configs drawn by random_start among the admitted ones, to tpe_startup(budget, admitted share): as long
  as ``own``'s evaluated start in expectation; then TPE;
- ``avoid``: that start, then TPE choosing among its samples those not evaluated nor rejected (study.Avoid: the
  tuner now).
It reports the best time found over the bucket's best (mean, worst), the share of searches within TOLERANCE and 1%
of it, the evaluated configs, and the asks per evaluated config.

    python3 -P bench/propose_replay.py --db /tmp/copy-of-results.db --budgets 8,12,24 --seeds 20 --space imputed
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import warnings

TOLERANCE = 0.03
MIN_CONFIGS = 20    # buckets with at least this many distinct ok configs


def landscapes(db: str, kernel: str, min_configs: int = MIN_CONFIGS) -> dict[tuple, dict[str, float]]:
    """(device id, kernel id, Problem) -> config JSON (sorted keys) -> the lowest median_ms of its ok trials; buckets
    with at least ``min_configs`` configs. Reads an SQLite file read-only."""
    import sqlite3
    from tunebench.shapes import Problem
    query = ("SELECT t.device_id, t.kernel_id, p.kernel, p.B, p.Hq, p.Hkv, p.Nq, p.Nk, p.D, p.dtype, p.causal, "
             "t.config_json, t.median_ms FROM trials t JOIN kernels k ON k.id = t.kernel_id "
             "JOIN problems p ON p.id = t.problem_id "
             "WHERE k.name = ? AND t.status = 'ok' AND t.median_ms IS NOT NULL AND p.page = 0")
    out: dict[tuple, dict[str, float]] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        for device, identity, *problem, config, ms in connection.execute(query, (kernel,)):
            name, b, hq, hkv, nq, nk, d, dtype, causal = problem
            bucket = out.setdefault((device, identity, Problem(name, b, hq, hkv, nq, nk, d, dtype,
                                                               causal=bool(causal))), {})
            key = json.dumps(json.loads(config), sort_keys=True)
            bucket[key] = min(bucket.get(key, ms), ms)
    return {label: ms for label, ms in out.items() if len(ms) >= min_configs}


def whole(recorded: dict[str, float], module, problem, space: str) -> dict[str, float | None]:
    """Every config of SPACE (JSON, sorted keys) -> its time, or None where it reads as rejected (see --space)."""
    from tunebench.tune.study import all_configs
    out: dict[str, float | None] = {}
    known = [(json.loads(key), ms) for key, ms in recorded.items()]
    for config in all_configs(module.SPACE):
        key = json.dumps(config, sort_keys=True)
        if key in recorded or space == "recorded" or module.keep(config, problem) is not None:
            out[key] = recorded.get(key)
            continue
        distance = {k: sum(config[p] != c[p] for p in config) for k, (c, _) in enumerate(known)}
        nearest = min(distance.values())
        out[key] = statistics.fmean(ms for k, (_, ms) in enumerate(known) if distance[k] == nearest)
    return out


STARTS = ("own", "queued", "avoid")


def replay(landscape: dict[str, float | None], space: dict, default: dict, budget: int, seed: int,
           start: str) -> dict:
    """One search on a whole landscape (``whole``), with one of STARTS (see the docstring); returns its best time,
    asks and evaluated configs."""
    import optuna
    from optuna.trial import TrialState
    from tunebench.registry import config_key
    from tunebench.tune.enqueue import ASK_FACTOR, ASK_SLACK, random_start
    from tunebench.tune.options import TuneOptions
    from tunebench.tune.study import Avoid, make_sampler, suggest_config, tpe_startup
    share = sum(ms is not None for ms in landscape.values()) / len(landscape) if start != "own" else 1.0
    seen: dict[str, float | None] = {}
    avoid = Avoid(space, lambda c: landscape.get(key := json.dumps(c, sort_keys=True)) is None or key in seen) \
        if start == "avoid" else None
    study = optuna.create_study(sampler=make_sampler(TuneOptions(seed=seed), budget, share, avoid),
                                direction="minimize")
    queue = [default]
    if start != "own":
        reasons = {config_key(json.loads(key)): None if ms is not None else "rejected" for key, ms in landscape.items()}
        queue += random_start(space, default, reasons, seed)[:tpe_startup(budget, share) - 1]
    for config in queue:
        study.enqueue_trial(config)
    asks = 0
    while sum(v is not None for v in seen.values()) < budget and asks < ASK_FACTOR * budget + ASK_SLACK:
        trial = study.ask()
        asks += 1
        key = json.dumps(suggest_config(trial, space), sort_keys=True)
        seen.setdefault(key, landscape.get(key))
        if seen[key] is None:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, seen[key])
    found = [v for v in seen.values() if v is not None]
    return {"best": min(found), "asks": asks, "evaluated": len(found)}


def compare(landscapes_: list[dict[str, float | None]], space: dict, default: dict, budget: int, seeds: range,
            starts: tuple[str, ...] = STARTS) -> dict:
    """Per start (own, queued): the best found over each landscape's best (mean, worst), the hit rate within
    TOLERANCE, evaluated configs per search and asks per evaluated config, over every landscape x seed."""
    out = {}
    for start in starts:
        ratios, asks, evaluated = [], 0, 0
        for landscape in landscapes_:
            best = min(ms for ms in landscape.values() if ms is not None)
            for seed in seeds:
                run = replay(landscape, space, default, budget, seed, start)
                ratios.append(run["best"] / best)
                asks += run["asks"]
                evaluated += run["evaluated"]
        out[start] = {
            "mean": statistics.fmean(ratios), "worst": max(ratios),
            "hits": sum(r <= 1 + TOLERANCE for r in ratios) / len(ratios),
            "hits_1": sum(r <= 1.01 for r in ratios) / len(ratios), "evaluated": evaluated / len(ratios),
            "asks_per_eval": asks / evaluated}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="a results database (SQLite; a copy: it is only read)")
    parser.add_argument("--kernel", default="flash_v2")
    parser.add_argument("--space", choices=("recorded", "imputed"), default="imputed")
    parser.add_argument("--budgets", default="8,12,24", help="evaluated configs per search, comma-separated")
    parser.add_argument("--seeds", type=int, default=20, help="searches per bucket and start")
    parser.add_argument("--first-seed", type=int, default=0, help="their seeds: FIRST..FIRST+SEEDS-1")
    parser.add_argument("--starts", default=",".join(STARTS), help=f"comma-separated, of {', '.join(STARTS)}")
    parser.add_argument("--min-configs", type=int, default=MIN_CONFIGS)
    args = parser.parse_args()
    import optuna
    from tunebench.registry import kernel_module
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    module = kernel_module(args.kernel)
    if hasattr(module, "_tma_supported"):
        module._tma_supported = lambda: True    # keep() as on the sm90 GPUs that recorded the landscapes
    default = json.dumps(module.DEFAULT, sort_keys=True)
    found = [whole(ms, module, problem, args.space) for (_, _, problem), ms in
             landscapes(args.db, args.kernel, args.min_configs).items() if default in ms]
    print(f"{len(found)} buckets of {args.kernel} with >= {args.min_configs} ok configs and DEFAULT, "
          f"--space {args.space}, seeds {args.first_seed}-{args.first_seed + args.seeds - 1}")
    print("| budget | start | best / bucket best (mean) | worst | within 3% | within 1% | evaluated | asks / evaluated |")
    print("|---|---|---|---|---|---|---|---|")
    for budget in (int(b) for b in args.budgets.split(",")):
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        for start, r in compare(found, module.SPACE, module.DEFAULT, budget, seeds,
                                tuple(args.starts.split(","))).items():
            print(f"| {budget} | {start} | {r['mean']:.4f} | {r['worst']:.3f} | {r['hits']:.1%} | "
                  f"{r['hits_1']:.1%} | {r['evaluated']:.1f} | {r['asks_per_eval']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Leave-one-out of safe transfer: would a shape that was not tuned still run at least as fast as DEFAULT?

For every shape of a tuned suite (default: the `transfer` suite), its own trials are hidden and the dispatcher's rule
(tunebench.transfer.choose) picks a config from the other buckets' stored trials. Then the shape's own winner, the
transferred choice, the old nearest-bucket winner and DEFAULT are timed head to head in this one process, in
interleaved rounds (the median of the round medians; do_bench, L2 flushed). Ratios are against DEFAULT and against the
shape's own winner, measured in the same run.

With --dispatch SUITE it then times what the dispatcher itself chooses (exact winner, safe transfer or DEFAULT) for
every shape of SUITE against DEFAULT, head to head: the check that no call of that suite runs slower than DEFAULT.
Paged decode shapes are timed by CUDA-graph replay, as the tuner times them.

Usage (GPU, after `tunebench tune --suite transfer --db DB`):
    python3 bench/transfer_loo.py --db DB --out benchmarks/h200 --dispatch headline
    python3 bench/transfer_loo.py --db DB --interpret --limit 3       # a check of the script on a CPU
Writes OUT/transfer-loo.csv (transfer-loo-SUITE.csv for another suite) and prints the table and the distribution.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import pathlib
import statistics


def evidence_by_bucket(store, device_name: str, problems, identity) -> dict:
    from tunebench.runtime import transfer
    from tunebench.shapes import bucket, bucket_key
    out = {}
    for p in problems:
        e = transfer.Evidence(bucket(p))
        for t in store.trials(device_name=device_name, kernel=p.kernel, source_hash=identity(p.kernel), problem=p):
            if t.status == "ok" and t.median_ms:
                e.add(t.config, t.median_ms)
        out[bucket_key(p)] = e
    return out


def nearest_winner(problem, evidence: list, default: dict) -> dict:
    """The rule transfer replaced: the best config of the nearest tuned bucket (shapes.bucket_distance)."""
    from tunebench.shapes import bucket, bucket_distance
    b = bucket(problem)
    near = min(evidence, key=lambda e: bucket_distance(b, e.bucket), default=None)
    if near is None or bucket_distance(b, near.bucket) == math.inf or not near.ms:
        return default
    return near.configs[min(near.ms, key=near.ms.get)]


def head_to_head(problem, configs: list[dict], rounds: int, interpret: bool) -> list[float]:
    """Each config's median time on one set of inputs, rounds interleaved, launched as the tuner launches it (its
    workload's arguments: an fp8 cache's scales, paged prefill's cu_seqlens_q). Paged decode is timed by graph
    replay, as the tuner times it (tunebench.tune.timing.bench_for)."""
    from tunebench.inputs import workload_for
    from tunebench.registry import config_key, kernel_module
    from tunebench.tune import timing
    module = kernel_module(problem.kernel)
    work = workload_for(problem, module, device="cpu" if interpret else "cuda")
    distinct = list({config_key(c): c for c in configs}.values())   # one config is timed once
    fns = [lambda c=c: module.launch(*work.args(c), config=c, out=work.out, **work.kwargs()) for c in distinct]
    bench = timing.bench_for(interpret, problem.paged)
    per_round = [[bench(fn).median_ms for fn in fns] for _ in range(rounds)]
    ms = {config_key(c): statistics.median(r[i] for r in per_round) for i, c in enumerate(distinct)}
    return [ms[config_key(c)] for c in configs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="the results database the suite was tuned into")
    parser.add_argument("--suite", default="transfer", help="the tuned suite")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape")
    parser.add_argument("--limit", type=int, default=None, help="only the first N shapes")
    parser.add_argument("--out", default=None, help="folder for transfer-loo.csv")
    parser.add_argument("--interpret", action="store_true", help="check the script on a CPU (not a measurement)")
    parser.add_argument("--dispatch", default=None, metavar="SUITE",
                        help="also time the dispatcher's own choice for each shape of SUITE against DEFAULT")
    args = parser.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    from tunebench.runtime import transfer
    from tunebench.registry import kernel_identity, kernel_module
    from tunebench.shapes import bucket_key, suite
    from tunebench.store import Store
    device_name = "cpu-interpreter" if args.interpret else __import__("torch").cuda.get_device_name()
    problems = suite(args.suite)[:args.limit]
    with Store(args.db, readonly=True) as store:
        evidence = evidence_by_bucket(store, device_name, problems, kernel_identity)
        winners = {bucket_key(w.problem): w.config for w in store.winners(device_name=device_name)
                   if w.source_hash == kernel_identity(w.kernel)}
    rows = []
    for i, p in enumerate(problems, 1):
        module, key = kernel_module(p.kernel), bucket_key(p)
        own = evidence[key]
        if not own.ms:
            print(f"[{i}/{len(problems)}] {p.label()}: no stored trials, skipped")
            continue
        rest = [e for k, e in evidence.items() if k != key]
        default = dict(module.DEFAULT)
        choice = transfer.choose(p, rest, default, lambda c: module.keep(c, p) is None)
        chosen = choice.config if choice else default
        own_best = winners.get(key) or own.configs[min(own.ms, key=own.ms.get)]   # the confirmed winner, if stored
        configs = [own_best, chosen, nearest_winner(p, rest, default), default]
        own_ms, chosen_ms, nearest_ms, default_ms = head_to_head(p, configs, args.rounds, args.interpret)
        rows.append(dict(shape=p.label(), transferred=choice is not None, why=choice.why() if choice else "DEFAULT",
                         own_ms=own_ms, chosen_ms=chosen_ms, nearest_ms=nearest_ms, default_ms=default_ms,
                         chosen_vs_default=default_ms / chosen_ms, chosen_vs_own=own_ms / chosen_ms,
                         nearest_vs_default=default_ms / nearest_ms, own_vs_default=default_ms / own_ms,
                         chosen=chosen, own=configs[0]))
        r = rows[-1]
        print(f"[{i}/{len(problems)}] {p.label():58s} chosen/DEFAULT {r['chosen_vs_default']:.3f}  chosen/own "
              f"{r['chosen_vs_own']:.3f}  nearest/DEFAULT {r['nearest_vs_default']:.3f}  "
              f"{'transferred' if choice else 'DEFAULT'}", flush=True)
    report(rows)
    write(rows, args.out, "transfer-loo.csv" if args.suite == "transfer" else f"transfer-loo-{args.suite}.csv")
    if args.dispatch:
        write(dispatch_check(args.db, args.dispatch, args.rounds, args.interpret), args.out, "dispatch-vs-default.csv")
    return 0


def dispatch_check(db: str, suite_name: str, rounds: int, interpret: bool) -> list[dict]:
    """The dispatcher's choice (reading ``db`` over the shipped results) against DEFAULT, per shape."""
    os.environ["TUNEBENCH_DB"] = db
    from tunebench.registry import kernel_module
    from tunebench.runtime.dispatch import Dispatcher
    from tunebench.shapes import suite
    dispatcher, rows = Dispatcher(), []
    for p in suite(suite_name):
        if interpret and p.dtype == "bfloat16":
            continue
        choice, default = dispatcher.choose(p), dict(kernel_module(p.kernel).DEFAULT)
        chosen_ms, default_ms = head_to_head(p, [choice.config, default], rounds, interpret)
        rows.append(dict(shape=p.label(), why=choice.why, chosen_ms=chosen_ms, default_ms=default_ms,
                         dispatched_vs_default=default_ms / chosen_ms, chosen=choice.config))
        print(f"dispatch {p.label():58s} {default_ms / chosen_ms:.3f}x DEFAULT  {choice.why[:90]}", flush=True)
    if rows:
        worst = min(rows, key=lambda r: r["dispatched_vs_default"])
        print(f"dispatched / DEFAULT over {len(rows)} {suite_name} shapes: worst {worst['dispatched_vs_default']:.3f} "
              f"({worst['shape']}), median {statistics.median(r['dispatched_vs_default'] for r in rows):.3f}; "
              f"goal >= 0.98 on every shape")
    return rows


def write(rows: list[dict], out: str | None, name: str) -> None:
    if not (out and rows):
        return
    path = pathlib.Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def report(rows: list[dict]) -> None:
    if not rows:
        print("no shape had stored trials")
        return
    for name in ("chosen_vs_default", "chosen_vs_own", "nearest_vs_default", "own_vs_default"):
        xs = sorted(r[name] for r in rows)
        q = statistics.quantiles(xs, n=10) if len(xs) > 1 else xs * 9
        print(f"{name:20s} min {xs[0]:.3f}  p10 {q[0]:.3f}  median {statistics.median(xs):.3f}  max {xs[-1]:.3f}")
    print(f"transferred on {sum(r['transferred'] for r in rows)} of {len(rows)} shapes; "
          f"goal: chosen/DEFAULT >= 0.98 on every shape, median chosen/own >= 0.97")


if __name__ == "__main__":
    raise SystemExit(main())

"""Leave-one-out of safe transfer: would a shape that was not tuned still run at least as fast as DEFAULT?

For every shape of a tuned suite (default: the `transfer` suite), its own trials are hidden and the dispatcher's rule
(tunebench.transfer.choose) picks a config from the other buckets' stored trials. Then the shape's own winner, the
transferred choice, the old nearest-bucket winner and DEFAULT are timed head to head in this one process, in
interleaved rounds (the median of the round medians; do_bench, L2 flushed). Ratios are against DEFAULT and against the
shape's own winner, measured in the same run.

With --dispatch SUITE it then times what the dispatcher itself chooses (exact winner, safe transfer or DEFAULT) for
every shape of SUITE against DEFAULT, head to head: the check that no call of that suite runs slower than DEFAULT.
For flash_v2's shapes it also times what tunebench.flash_attention(variant="auto") runs there (flash_v3's config or
flash_v2's), against the same DEFAULT in the same rounds.
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
    """Each config's median time on one set of inputs of this problem (see timed_runs)."""
    return timed_runs([(problem, c) for c in configs], rounds, interpret)


def timed_runs(runs: list[tuple], rounds: int, interpret: bool) -> list[float]:
    """Each (problem, config)'s median time, rounds interleaved, launched as the tuner launches it (its workload's
    arguments: an fp8 cache's scales, paged prefill's cu_seqlens_q); one set of inputs per problem, and a run that
    repeats another is timed once. The problems may be of different kernels (variant="auto" against flash_v2's
    DEFAULT) but not mix paged decode with the rest: paged decode is timed by graph replay, as the tuner times it
    (tunebench.tune.timing.bench_for)."""
    from tunebench.inputs import workload_for
    from tunebench.registry import config_key, kernel_module
    from tunebench.tune import timing
    if len({p.paged for p, _ in runs}) != 1:
        raise ValueError("timed_runs: paged decode and other kernels are timed differently; time them apart")
    works, fns = {}, {}
    for problem, config in runs:
        module = kernel_module(problem.kernel)
        if problem not in works:
            works[problem] = workload_for(problem, module, device="cpu" if interpret else "cuda")
        work = works[problem]
        fns.setdefault((problem, config_key(config)), lambda m=module, w=work, c=config: m.launch(
            *w.args(c), config=c, out=w.out, **w.kwargs()))
    bench = timing.bench_for(interpret, runs[0][0].paged)
    per_round = [{key: bench(fn).median_ms for key, fn in fns.items()} for _ in range(rounds)]
    return [statistics.median(r[(p, config_key(c))] for r in per_round) for p, c in runs]


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
    """The dispatcher's choice (reading ``db`` over the shipped results) against DEFAULT, per shape; for a shape of
    variant="auto"'s fallback kernel (flash_v2), also what tunebench.flash_attention(variant="auto") runs there (the
    kernel runtime.dispatch.auto_kernel picks, with that kernel's dispatched config), timed in the same rounds."""
    os.environ["TUNEBENCH_DB"] = db
    from dataclasses import replace
    from tunebench.inputs import workload_for
    from tunebench.registry import kernel_module
    from tunebench.runtime import dispatch
    from tunebench.shapes import suite
    dispatch.reload()                       # auto_kernel reads the module's dispatcher: on this db from now on
    dispatcher, rows = dispatch.Dispatcher(), []
    for p in suite(suite_name):
        if interpret and p.dtype == "bfloat16":
            continue
        choice, default = dispatcher.choose(p), dict(kernel_module(p.kernel).DEFAULT)
        runs = [(p, choice.config), (p, default)]
        auto = None
        if p.kernel == dispatch.AUTO_KERNELS[-1]:
            # auto_kernel reads only the tensors' shapes, dtypes, strides and alignment: no values are drawn.
            work = workload_for(p, kernel_module(p.kernel), device="cpu" if interpret else "cuda", fill=False)
            kernel, auto_why = dispatch.auto_kernel(work.q, work.k, work.v, p.causal)
            auto = replace(p, kernel=kernel)
            runs.append((auto, dispatcher.choose(auto).config))
        chosen_ms, default_ms, *auto_ms = timed_runs(runs, rounds, interpret)
        rows.append(dict(shape=p.label(), why=choice.why, chosen_ms=chosen_ms, default_ms=default_ms,
                         dispatched_vs_default=default_ms / chosen_ms, chosen=choice.config,
                         auto_kernel=auto.kernel if auto else "", auto_ms=auto_ms[0] if auto else "",
                         auto_vs_default=default_ms / auto_ms[0] if auto else "", auto_why=auto_why if auto else ""))
        print(f"dispatch {p.label():58s} {default_ms / chosen_ms:.3f}x DEFAULT"
              + (f"  auto ({auto.kernel}) {default_ms / auto_ms[0]:.3f}x" if auto else "")
              + f"  {choice.why[:80]}", flush=True)
    for column, name in (("dispatched_vs_default", "dispatched"), ("auto_vs_default", 'variant="auto"')):
        timed = [r for r in rows if r[column] != ""]
        if timed:
            worst = min(timed, key=lambda r: r[column])
            print(f"{name} / DEFAULT over {len(timed)} {suite_name} shapes: worst {worst[column]:.3f} "
                  f"({worst['shape']}), median {statistics.median(r[column] for r in timed):.3f}; "
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

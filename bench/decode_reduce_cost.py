"""What paged decode's split-K reduce costs, on a GPU (issue 19): for each decode shape of a suite (default: the
headline decode rows and the bench's ragged batch), the dispatched config with and without its split, and the split's
two launches each alone.

With PARTITION > 0 and more than one partition, kernels/paged_attention.py launches two kernels: the decode kernel
writes each partition's partial result (m, l and acc, fp32 scratch) and a reduce kernel merges them into the output.
Per shape:
- split: the dispatched config if it splits; else the same config with DEFAULT's PARTITION (or the largest in SPACE
  that still splits the context); the row's note says which;
- no split: the same config with PARTITION 0 (one partition per sequence, one launch);
- decode alone, reduce alone: the split's two launches, recorded from one call (the kernel module's launch runs once
  with its two jit kernels wrapped to keep each launch's grid and arguments) and replayed one at a time;
- all graph-timed (tunebench.tune.timing.graph_bench: CUDA-graph replay, host overhead left out), split and no split
  also launch by launch (do_bench), where the second launch's host cost shows.
reduce share = reduce alone / split (graph); split gain = no split / split (graph; > 1: the split pays, reduce
included). Both configs are checked against the float64 reference before anything is timed.

Usage (GPU):
    python3 bench/decode_reduce_cost.py [--suite headline] [--out DIR] [--rep-ms 100]
Prints the table; with --out, writes DIR/decode-reduce-cost.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import pathlib
import sys

from tunebench.bench.script import script_device, write_csv

LAUNCHED = ("_paged_decode", "_paged_reduce")      # the jit kernels kernels/paged_attention.py launches, in order
FIELDS = ("problem", "dispatched", "split_partition", "partitions", "split_graph_ms", "split_launch_ms",
          "no_split_graph_ms", "no_split_launch_ms", "decode_alone_ms", "reduce_alone_ms", "reduce_share",
          "split_gain", "note")


class _Recorder:
    """Stands in for a jit kernel: kernel[grid](*args) launches it as usual and keeps a replay of that launch."""

    def __init__(self, name: str, jit, log: list):
        self.name, self.jit, self.log = name, jit, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, functools.partial(self.jit[grid], *args, **kwargs)))
            return self.jit[grid](*args, **kwargs)
        return launch


@contextlib.contextmanager
def recording(module, names=LAUNCHED):
    """Inside the block, every launch of module's jit kernels ``names`` is appended to the yielded list as
    (name, replay): replay() launches it again alone, on the same tensors (scratch included)."""
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise AttributeError(f"{module.__name__} has no {', '.join(missing)}: update LAUNCHED in {__file__}")
    saved = {n: getattr(module, n) for n in names}
    log: list = []
    try:
        for n, jit in saved.items():
            setattr(module, n, _Recorder(n, jit, log))
        yield log
    finally:
        for n, jit in saved.items():
            setattr(module, n, jit)


def split_variants(module, config: dict, tokens: int) -> tuple[dict | None, dict, str]:
    """(a config that splits ``tokens`` or None, the same config unsplit, how the split one was chosen)."""
    whole = dict(config, PARTITION=0)
    if config["PARTITION"] and tokens > config["PARTITION"]:
        return dict(config), whole, "the dispatched config splits"
    parts = [p for p in module.SPACE["PARTITION"] if p and p % config["BLOCK_N"] == 0 and p < tokens]
    if not parts:
        return None, whole, f"no PARTITION of SPACE splits {tokens} tokens: nothing to reduce"
    pick = module.DEFAULT["PARTITION"] if module.DEFAULT["PARTITION"] in parts else max(parts)
    return dict(config, PARTITION=pick), whole, f"the dispatched config does not split; split with PARTITION {pick}"


def checked_call(module, inputs, reference, config: dict):
    """() -> out launching ``config`` on the bench inputs, after one NaN-poisoned run checked against the reference."""
    import torch
    out = torch.full_like(inputs.q, math.nan)
    args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_tables, inputs.context_lens)
    scales = {} if inputs.k_scale is None else {"k_scale": inputs.k_scale, "v_scale": inputs.v_scale}   # fp8 cache

    def call():
        return module.launch(*args, config=config, out=out, **scales)
    call()
    verdict = reference.check(out)
    if not verdict.ok:
        raise AssertionError(f"{config} disagrees with the float64 reference: {verdict.reason}")
    return call


def measure_shape(problem, *, device, graph, launches, config: dict | None = None, seed: int = 0) -> dict:
    """One row: the split and unsplit configs (checked, then timed), and the split's two launches timed alone.
    graph, launches: fn -> Timing (tunebench.tune.timing). config: the dispatched one unless given."""
    import tunebench
    from tunebench.bench.measure import build_inputs
    from tunebench.bench.ragged import RaggedDecode
    from tunebench.registry import kernel_module
    module = kernel_module("paged_attention")
    inputs, reference = build_inputs(problem, device, seed)
    tokens = inputs.block_tables.shape[1] * problem.page          # what the table addresses: the dispatcher's Nk
    base = problem.padded() if isinstance(problem, RaggedDecode) else problem
    config = dict(config or tunebench.tuned_config(dataclasses.replace(base, Nk=tokens)))
    split, whole, note = split_variants(module, config, tokens)
    row = dict.fromkeys(FIELDS)
    row.update(problem=problem.label(), dispatched=str(config), note=note)
    call_whole = checked_call(module, inputs, reference, whole)
    row["no_split_graph_ms"] = graph(call_whole).median_ms
    row["no_split_launch_ms"] = launches(call_whole).median_ms
    if split is None:
        return row
    call_split = checked_call(module, inputs, reference, split)
    with recording(module) as log:
        call_split()
    alone = dict(log)
    row.update(split_partition=split["PARTITION"], partitions=-(-tokens // split["PARTITION"]),
               split_graph_ms=graph(call_split).median_ms, split_launch_ms=launches(call_split).median_ms,
               decode_alone_ms=graph(alone["_paged_decode"]).median_ms)
    if "_paged_reduce" in alone:
        row["reduce_alone_ms"] = graph(alone["_paged_reduce"]).median_ms
        row["reduce_share"] = row["reduce_alone_ms"] / row["split_graph_ms"]
    row["split_gain"] = row["no_split_graph_ms"] / row["split_graph_ms"]
    return row


def format_rows(rows: list[dict]) -> str:
    from tunebench.text import format_number, table
    head = ["problem", "split", "split ms", "launches", "no split ms", "launches", "decode alone", "reduce alone",
            "reduce share", "split gain"]
    body = [[r["problem"], format_number(r["split_partition"], "d"),
             *(format_number(r[k], ".4f") for k in ("split_graph_ms", "split_launch_ms", "no_split_graph_ms",
                                                    "no_split_launch_ms", "decode_alone_ms", "reduce_alone_ms")),
             format_number(r["reduce_share"], ".1%"), format_number(r["split_gain"], ".2f")] for r in rows]
    notes = [f"{r['problem']}: {r['dispatched']}; {r['note']}" for r in rows]
    return (table(head, body, right=tuple(range(1, len(head)))) + "\n(ms: graph-timed; 'launches': launch by launch)\n"
            + "\n".join(notes))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="headline", help="the suite whose decode shapes are measured")
    parser.add_argument("--out", default=None, help="directory for decode-reduce-cost.csv")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="ms of launches per timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if script_device("decode_reduce_cost.py") is None:
        return 2
    import torch
    from tunebench.commands.bench import bench_problems
    from tunebench.tune.timing import gpu_bench, graph_bench
    graph = functools.partial(graph_bench, rep=args.rep_ms)
    rows = []
    for problem in bench_problems(args.suite, None, ["paged_attention"]):
        print(f"{problem.label()} ...", file=sys.stderr, flush=True)
        rows.append(measure_shape(problem, device="cuda", graph=graph, launches=gpu_bench, seed=args.seed))
        torch.cuda.empty_cache()
    print(format_rows(rows))
    if args.out:
        print(f"wrote {write_csv(pathlib.Path(args.out) / 'decode-reduce-cost.csv', FIELDS, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

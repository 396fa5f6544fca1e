"""What paged decode's safety costs, on a GPU (issue 16): the masked kernel (block ids and lengths checked in the
kernel, the default) against the old unmasked one, and check=True (error flags read back after the launch).

kernels/paged_attention.py checks every block id it reads against [0, num_blocks) and every context length against
the table's capacity, and turns a bad sequence's output into NaN. launch(..., _safe=False) compiles the same kernels
without those checks; it is reachable only from here. Per decode shape (default: B1 x 32k, B16 x 16k, B64 x 4k,
B128 x 1k; bf16, Hq 32, Hkv 8, D 128, page 16), with the config the dispatcher picks:
- unmasked, masked: graph-timed (tunebench.tune.timing.graph_bench: CUDA-graph replay, host overhead left out), in
  `--rounds` interleaved rounds (unmasked, masked, unmasked, ...), the median of each's medians kept;
  mask ratio = masked / unmasked (the issue asks <= 1.02), and each one's K/V bandwidth in GB/s;
- check=True cannot be captured in a graph (it reads the flags back: a device sync), so it is timed launch by launch
  (do_bench) against the masked kernel timed the same way: check cost = the difference per call, in microseconds.
All three are checked against the float64 reference first; a row notes if their outputs are not bit-identical.

Usage (GPU):
    python3 bench/paged_check_cost.py [--out DIR] [--rep-ms 25] [--rounds 3] [--shapes 1x32768,16x16384]
Prints the table; with --out, writes DIR/paged-check-cost.csv and DIR/paged-check-cost.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import statistics
import sys

from tunebench.bench.script import script_device, write_csv

SHAPES = ((1, 32768), (16, 16384), (64, 4096), (128, 1024))       # (B, context length)
GEOMETRY = dict(Hq=32, Hkv=8, D=128, dtype="bfloat16", page=16)
FIELDS = ("problem", "config", "unmasked_graph_ms", "masked_graph_ms", "mask_ratio", "unmasked_gbps", "masked_gbps",
          "masked_launch_ms", "check_launch_ms", "check_ratio", "check_cost_us", "identical")


def problems(shapes=SHAPES, Hq=32, Hkv=8, D=128, dtype="bfloat16", page=16) -> list:
    from tunebench.shapes import Problem
    return [Problem("paged_attention", B, Hq, Hkv, 1, n, D, dtype, page=page) for B, n in shapes]


def variants(module, inputs, config: dict) -> dict:
    """{"unmasked", "masked", "check": () -> out}, each writing its own NaN-poisoned output tensor."""
    import torch
    args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_tables, inputs.context_lens)
    options = {"unmasked": dict(_safe=False), "masked": {}, "check": dict(check=True)}
    calls = {}
    for name, extra in options.items():
        out = torch.full_like(inputs.q, math.nan)
        calls[name] = functools.partial(module.launch, *args, config=config, out=out, **extra)
    return calls


def checked_variants(module, inputs, reference, config: dict) -> tuple[dict, bool]:
    """(variants(), whether their outputs agree bit for bit), after one run of each, every one checked against the
    float64 reference."""
    import torch
    calls = variants(module, inputs, config)
    outs = {name: call() for name, call in calls.items()}
    for name, out in outs.items():
        verdict = reference.check(out)
        if not verdict.ok:
            raise AssertionError(f"{config}: the {name} kernel disagrees with the float64 reference: {verdict.reason}")
    return calls, all(torch.equal(outs[name], outs["masked"]) for name in ("unmasked", "check"))


def kv_bytes(problem, tokens: int) -> int:
    """K and V bytes one decode call reads: every sequence's whole context, all KV heads."""
    from tunebench.kernels._launch import ELEMENT_BYTES
    return 2 * problem.B * tokens * problem.Hkv * problem.D * ELEMENT_BYTES[problem.dtype]


def measure_shape(problem, *, device, graph, launches, rounds: int = 3, config: dict | None = None,
                  seed: int = 0) -> dict:
    """One row. graph, launches: fn -> Timing (tunebench.tune.timing); config: the dispatcher's unless given."""
    import tunebench
    from tunebench.bench.measure import build_inputs
    from tunebench.registry import kernel_module
    module = kernel_module("paged_attention")
    inputs, reference = build_inputs(problem, device, seed)
    tokens = inputs.block_tables.shape[1] * problem.page              # what the table addresses: the dispatcher's Nk
    config = dict(config or tunebench.tuned_config(dataclasses.replace(problem, Nk=tokens)))
    calls, identical = checked_variants(module, inputs, reference, config)
    graph_ms = {"unmasked": [], "masked": []}
    for _ in range(rounds):
        for name, times in graph_ms.items():
            times.append(graph(calls[name]).median_ms)
    row = dict.fromkeys(FIELDS)
    row.update(problem=problem.label(), config=str(config), identical=identical)
    row["unmasked_graph_ms"], row["masked_graph_ms"] = (statistics.median(graph_ms[n]) for n in graph_ms)
    row["mask_ratio"] = row["masked_graph_ms"] / row["unmasked_graph_ms"]
    moved = kv_bytes(problem, problem.Nk)
    row["unmasked_gbps"], row["masked_gbps"] = (moved / (row[f"{n}_graph_ms"] * 1e6) for n in graph_ms)
    row["masked_launch_ms"] = launches(calls["masked"]).median_ms
    row["check_launch_ms"] = launches(calls["check"]).median_ms
    row["check_ratio"] = row["check_launch_ms"] / row["masked_launch_ms"]
    row["check_cost_us"] = (row["check_launch_ms"] - row["masked_launch_ms"]) * 1e3
    return row


def format_rows(rows: list[dict]) -> str:
    from tunebench.text import format_number, table
    head = ["problem", "unmasked ms", "masked ms", "mask ratio", "unmasked GB/s", "masked GB/s", "masked (launch)",
            "check=True (launch)", "check ratio", "check cost us"]
    body = [[r["problem"], *(format_number(r[k], ".4f") for k in ("unmasked_graph_ms", "masked_graph_ms")),
             format_number(r["mask_ratio"], ".3f"),
             *(format_number(r[k], ".0f") for k in ("unmasked_gbps", "masked_gbps")),
             *(format_number(r[k], ".4f") for k in ("masked_launch_ms", "check_launch_ms")),
             format_number(r["check_ratio"], ".3f"), format_number(r["check_cost_us"], ".1f")] for r in rows]
    notes = [f"{r['problem']}: {r['config']}" + ("" if r["identical"] else "; outputs not bit-identical (each passes "
                                                                          "the reference)") for r in rows]
    return (table(head, body, right=tuple(range(1, len(head))))
            + "\n(ms: graph-timed unless '(launch)': launch by launch, host overhead and check=True's sync included)\n"
            + "\n".join(notes))


def write(rows: list[dict], out: str) -> list[pathlib.Path]:
    csv_path = write_csv(pathlib.Path(out) / "paged-check-cost.csv", FIELDS, rows)
    json_path = csv_path.with_suffix(".json")
    json_path.write_text(json.dumps(rows, indent=1))
    return [csv_path, json_path]


def parse_shapes(text: str) -> tuple:
    """"1x32768,16x16384" -> ((1, 32768), (16, 16384))."""
    try:
        return tuple(tuple(int(x) for x in item.split("x")) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes must look like 1x32768,16x16384 (B x context), got {text!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for paged-check-cost.csv and .json")
    parser.add_argument("--rep-ms", type=float, default=25.0, help="ms of launches per graph timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of unmasked and masked")
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="B x context, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if script_device("paged_check_cost.py") is None:
        return 2
    import torch
    from tunebench.tune.timing import gpu_bench, graph_bench
    graph = functools.partial(graph_bench, rep=args.rep_ms)
    rows = []
    for problem in problems(args.shapes, **GEOMETRY):
        print(f"{problem.label()} ...", file=sys.stderr, flush=True)
        rows.append(measure_shape(problem, device="cuda", graph=graph, launches=gpu_bench, rounds=args.rounds,
                                  seed=args.seed))
        torch.cuda.empty_cache()
    print(format_rows(rows))
    if args.out:
        for path in write(rows, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

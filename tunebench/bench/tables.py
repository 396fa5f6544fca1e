"""Formatting `tunebench bench`'s measurements: pure functions, so they can be tested on synthetic numbers.

Throughput: prefill in TFLOP/s (Problem.flops: QK^T and PV, halved when causal); decode in GB/s of effective KV
bandwidth (the K and V bytes a decode step must read, over its time), as paged-attention papers count it; for a
ragged batch (bench/ragged.py) those bytes are the sum of its lengths, whatever a provider pads to.

Decode rows are timed by CUDA-graph replay (graph_ms) and launch by launch (launch_ms); throughput, the ratio against
the best peer and % of the copy ceiling come from graph_ms (measure.py says why). Prefill rows are timed launch by
launch only (graph_ms empty), unless `tunebench bench --graph-prefill` graph-times them as well.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..shapes import Problem
from ..text import format_number as _fmt, format_speedup, jsonable, table
from .measure import GRAPH, OK, Ceilings, Measurement
from .ragged import RaggedDecode


def best_peer(measurements: list[Measurement]) -> Measurement | None:
    timed = [m for m in measurements if m.peer and m.status == OK and m.median_ms]
    return min(timed, key=lambda m: m.median_ms) if timed else None


def rows(measurements: list[Measurement], ceilings: Ceilings | None) -> list[dict]:
    """One flat row per measurement (CSV/JSON), with throughput, ratio against the best peer of the same problem,
    and percent of the relevant measured ceiling."""
    by_problem: dict[Problem, list[Measurement]] = {}
    for m in measurements:
        by_problem.setdefault(m.problem, []).append(m)
    out = []
    for problem, ms in by_problem.items():
        peer = best_peer(ms)
        peer_tp = problem.throughput(peer.median_ms) if peer else None
        ceiling, ceiling_name = ceilings.for_problem(problem) if ceilings else (None, "")
        for m in ms:
            tp = problem.throughput(m.median_ms) if m.status == OK else None
            out.append({
                "problem": problem.label(), "phase": "decode" if problem.paged else "prefill",
                "dtype": problem.dtype, "kv_dtype": problem.kv_dtype, "B": problem.B, "Hq": problem.Hq, "Hkv": problem.Hkv, "Nq": problem.Nq,
                "Nk": problem.Nk, "D": problem.D, "causal": problem.causal,
                "provider": m.provider, "peer": m.peer, "status": m.status,
                "median_ms": m.median_ms, "p20_ms": m.p20_ms, "p80_ms": m.p80_ms,
                "timed_by": m.timed_by or None,
                "graph_ms": m.median_ms if m.timed_by == GRAPH else None, "launch_ms": m.launch_ms,
                "launch_vs_graph": m.launch_ms / m.median_ms if m.timed_by == GRAPH and m.median_ms else None,
                "ragged": problem.recipe if isinstance(problem, RaggedDecode) else None,
                "kv_tokens": (problem.tokens if isinstance(problem, RaggedDecode) else problem.B * problem.Nk)
                if problem.paged else None,
                "throughput": tp, "unit": problem.unit,
                "tflops": problem.flops / (m.median_ms * 1e-3) / 1e12 if tp else None,
                "intensity": problem.flops / problem.min_bytes,
                "best_peer": peer.provider if peer else None,
                "vs_best_peer": tp / peer_tp if tp and peer_tp else None,
                "ceiling": ceiling, "ceiling_name": ceiling_name,
                "pct_of_ceiling": 100.0 * tp / ceiling if tp and ceiling else None,
                "err_ratio": m.err_ratio, "rounds": len(m.round_ms) or None,
                "round_spread": max(m.round_ms) / min(m.round_ms) if len(m.round_ms) > 1 else None,
                "note": m.note,
            })
    return out


DECODE_TIMING = ("decode timed by CUDA-graph replay (graph ms); GB/s, vs best peer and % ceiling come from it. "
                 "launches ms: launch by launch (do_bench), host overhead and every launch included")
PREFILL_GRAPH_TIMING = ("prefill timed by CUDA-graph replay too (--graph-prefill; graph ms, no L2 flush): TFLOP/s, vs "
                        "best peer and % ceiling come from it. launches ms: do_bench, L2 flushed, host launch cost "
                        "included")


def format_table(problem_rows: list[dict]) -> str:
    """A table for one problem's rows (fastest first, then the untimed). Decode shows both timings."""
    first = problem_rows[0]
    ceiling = (f"ceiling {first['ceiling']:.0f} {first['ceiling_name']} (measured in this run)"
               if first["ceiling"] else "no ceiling measured")
    head = f"{first['problem']}  [{first['intensity']:.0f} FLOPs/byte; {ceiling}]"
    ordered = sorted(problem_rows, key=lambda r: (r["throughput"] is None, -(r["throughput"] or 0)))
    decode = first["phase"] == "decode"
    graphed = any(r["timed_by"] == GRAPH for r in problem_rows)
    times = ["graph ms", "launches ms"] if graphed else ["median ms"]
    body = table(["provider", "status", *times, first["unit"], "vs best peer", "% ceiling", "round spread", "note"],
                 [[r["provider"], r["status"], _fmt(r["median_ms"], ".4f"),
                   *([_fmt(r["launch_ms"], ".4f")] if graphed else []), _fmt(r["throughput"], ".1f"),
                   format_speedup(r["vs_best_peer"] or None), _fmt(r["pct_of_ceiling"], ".0f"),
                   format_speedup(r["round_spread"]), r["note"][:110]]
                  for r in ordered], right=tuple(range(2, 7 + graphed)), indent="  ")
    timing = DECODE_TIMING if decode else PREFILL_GRAPH_TIMING
    lines = [head] + ([f"  {timing}"] if graphed else []) + [body]
    peer = first["best_peer"]
    lines.append(f"  best peer: {peer}" if peer else "  best peer: none timed")
    return "\n".join(lines)


def _throughput_of(rows_: list[dict], problem: str, provider: str) -> float | None:
    return next((r["throughput"] for r in rows_ if r["problem"] == problem and r["provider"] == provider), None)


def summary(rows_: list[dict]) -> list[str]:
    """The issue's goal ratios, one line per problem they apply to; a missing side says so."""
    lines = []
    problems = list(dict.fromkeys(r["problem"] for r in rows_))
    first = {r["problem"]: r for r in rows_}

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"

    for label in problems:
        r = first[label]
        if r["phase"] == "prefill":
            v2 = _throughput_of(rows_, label, "tunebench-v2")
            if r["D"] == 128 and r["Nk"] >= 4096 and r["dtype"] in ("float16", "bfloat16"):
                # Issue 18's goals, for what variant="auto" runs (flash_v3 where it won) and for flash_v2 alone.
                cudnn, fa2 = (_throughput_of(rows_, label, peer) for peer in ("sdpa-cudnn", "sdpa-flash"))
                for provider in ("tunebench-auto", "tunebench-v2"):
                    tp = _throughput_of(rows_, label, provider)
                    if tp or provider == "tunebench-v2":
                        lines.append(f"prefill {label}: {provider} {_fmt(tp, '.0f')} TFLOP/s = {ratio(tp, cudnn)} "
                                     f"cuDNN (goal >= 1.0), {ratio(tp, fa2)} FlashAttention-2 (goal >= 1.7)")
            v1 = _throughput_of(rows_, label, "tunebench-v1")
            if v1:
                lines.append(f"v2/v1 {label}: {ratio(v2, v1)}")
        else:
            paged = next((x for x in rows_ if x["problem"] == label and x["provider"] == "tunebench-paged"), None)
            if paged is None:
                continue
            lines.append(_decode_summary(label, paged))
            if r["kv_dtype"]:
                lines.append(_fp8_summary(rows_, label, r["kv_dtype"], paged))
    return lines


def _fp8_summary(rows_: list[dict], label: str, kv_dtype: str, paged: dict) -> str:
    """Issue 19's fp8 goal: the fp8 cache's graph-timed time against the bf16 cache's of the same shape and run."""
    base = label.removesuffix(f" kv {kv_dtype}")
    bf16 = next((x for x in rows_ if x["problem"] == base and x["provider"] == "tunebench-paged"), None)
    ratio = paged["graph_ms"] / bf16["graph_ms"] if bf16 and bf16["graph_ms"] and paged["graph_ms"] else None
    text = f"{ratio:.3f}x" if ratio else "n/a (not timed in this run)"
    return f"fp8 {label}: {text} the time of the {base.split()[1]} cache's row, graph-timed (goal <= 0.55x)"


def _decode_summary(label: str, paged: dict) -> str:
    """Issue 19's decode goals, from the graph-timed figure: >= 90% of copy bandwidth where the batch holds >= 32k
    tokens, >= 1.0x the best peer (>= 1.2x on a ragged batch); the launch-by-launch GB/s beside it."""
    tp, graph_ms, launch_ms = paged["throughput"], paged["graph_ms"], paged["launch_ms"]
    launched = tp * graph_ms / launch_ms if tp and graph_ms and launch_ms else None
    goal = " (goal >= 90%: B x context >= 32k)" if (paged["kv_tokens"] or 0) >= 32768 else ""
    peer_goal = 1.2 if paged["ragged"] else 1.0
    peer = paged["best_peer"] or "none timed"
    return (f"decode {label}: tunebench-paged {_fmt(tp, '.0f')} GB/s graph-timed "
            f"({_fmt(launched, '.0f')} launch by launch) = {_fmt(paged['pct_of_ceiling'], '.0f')}% of copy "
            f"bandwidth{goal}, {format_speedup(paged['vs_best_peer'])} best peer {peer} (goal >= {peer_goal})")


def write_csv(rows_: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_[0]) if rows_ else ["problem"])
        writer.writeheader()
        for r in rows_:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})


def write_json(rows_: list[dict], ceilings: Ceilings | None, meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta,
           "ceilings": None if ceilings is None else {
               "copy_bytes_per_s": ceilings.copy_bytes_per_s, "matmul_flops_per_s": ceilings.matmul_flops_per_s,
               "notes": ceilings.notes},
           "rows": jsonable(rows_)}
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")


def write_outputs(measurements: list[Measurement], ceilings: Ceilings | None, meta: dict, out_dir: Path) -> None:
    """bench.csv, bench.json and bench.md (the tables and the summary, for BENCHMARKS.md) in out_dir."""
    all_rows = rows(measurements, ceilings)
    write_csv(all_rows, out_dir / "bench.csv")
    write_json(all_rows, ceilings, meta, out_dir / "bench.json")
    tables = [format_table([r for r in all_rows if r["problem"] == label])
              for label in dict.fromkeys(r["problem"] for r in all_rows)]
    header = [f"device: {meta.get('device')} (capability {meta.get('capability')}, driver {meta.get('driver')}); "
              f"torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}; {meta.get('date')}",
              f"command: {meta.get('command')}"]
    if ceilings is not None:
        header.append(format_ceilings(ceilings))
    body = "\n".join(header) + "\n\n" + "\n\n".join(tables) + "\n\nsummary:\n" + "\n".join(summary(all_rows))
    (out_dir / "bench.md").write_text("```\n" + body + "\n```\n")


def format_ceilings(c: Ceilings) -> str:
    parts = [f"copy {c.copy_bytes_per_s / 1e12:.2f} TB/s"]
    parts += [f"{dtype} matmul {rate / 1e12:.0f} TFLOP/s" for dtype, rate in sorted(c.matmul_flops_per_s.items())]
    return "ceilings measured in this run: " + ", ".join(parts)

"""Markdown tables for BENCHMARKS.md from `tunebench bench` CSVs: one row per problem, one column per provider."""
import csv
import sys
from collections import OrderedDict


def table(path, providers, kernel=None):
    rows = [r for r in csv.DictReader(open(path)) if r["status"] == "ok" and (kernel is None or r["problem"].startswith(kernel))]
    by_problem = OrderedDict()
    for r in rows:
        by_problem.setdefault(r["problem"], {})[r["provider"]] = r
    unit = rows[0]["unit"] if rows else ""
    head = ["problem"] + providers + ["tuned / best peer"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for problem, got in by_problem.items():
        cells = [f"{float(got[p]['throughput']):.0f}" if p in got else "-" for p in providers]
        tuned = next((got[p] for p in ("tunebench-v2", "tunebench-paged") if p in got), None)
        ratio = f"{float(tuned['vs_best_peer']):.2f}x" if tuned else "-"
        out.append("| " + " | ".join([problem.split(" ", 1)[1]] + cells + [ratio]) + " |")
    return f"({unit})\n\n" + "\n".join(out)


if __name__ == "__main__":
    path, kernel, *providers = sys.argv[1:]
    print(table(path, providers, None if kernel == "-" else kernel))

"""Where a tuning run's wall time went, from the timeline it wrote with $TUNEBENCH_TRACE=FILE (tunebench/tune/trace.py).

    python3 bench/trace_summary.py FILE

Prints:
- the run's phases: from the process's start to its first worker's, starting the workers (and when the parent had
  checked the GPU, opened its databases and imported the kernels), reading the device, then per problem: opening its
  study, the search, the confirmation (re-timing the finalists), and closing the workers;
- when the workers' processes started, finished their imports and were warm (CUDA context, Triton), by role;
- per runner (a GPU worker): its time in each kind of request (Setup, Run, Retime, ...), and in each problem's search
  the share of the wall time it was busy, and its idle gaps between a reply and the next request (the parent's
  latency in feeding it);
- each runner's idle time from the device read to the last result;
- each re-timing: the runners that took it, and every finalist's round medians;
- the parent's own work: time in Optuna asks, writing results, reading the study, in all and per trial.
"""
from __future__ import annotations

import collections
import json
import statistics
import sys


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def busy_intervals(events: list[dict]) -> dict[str, list[tuple[float, float, str]]]:
    """worker -> [(start, end, request)]: a Setup sent before a Run is its own interval, ending when the Run is sent;
    a request sent to wait behind another (queued: Worker.enqueue) starts when the parent reads the other's reply."""
    open_: dict[str, tuple[float, str]] = {}
    waiting: dict[str, str] = {}
    out: dict[str, list] = collections.defaultdict(list)
    for e in events:
        w = e.get("worker")
        if e["kind"] == "send" and e.get("queued"):
            waiting[w] = e["request"]
        elif e["kind"] == "send":
            if w in open_:
                start, request = open_[w]
                out[w].append((start, e["t"], request))
            open_[w] = (e["t"], e["request"])
        elif e["kind"] == "done" and w in open_:
            start, request = open_.pop(w)
            out[w].append((start, e["t"], request))
            if w in waiting:
                open_[w] = (e["t"], waiting.pop(w))
    return out


def overlap(intervals, lo: float, hi: float) -> float:
    return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b, _ in intervals)


def main(path: str) -> None:
    events = load(path)
    first = {}
    for e in events:
        first.setdefault(e["kind"], e["t"])
    t0 = events[0]["t"]
    end = events[-1]["t"]
    print(f"trace of {end - t0:.1f} s, {len(events)} events")

    # -- phases
    problems = []   # {label, begin, study_loaded, searched, confirmed}
    for e in events:
        if e["kind"] == "problem":
            problems.append({"label": e["label"], "begin": e["t"]})
        elif e["kind"] == "study_loaded" and problems:  # written while the problem's search is created
            problems[-1].setdefault(e["kind"], e["t"])
        elif e["kind"] in ("searched", "confirmed") and "index" in e:
            # A problem's confirmation may end during the next one's search (re-timed in the background).
            problems[e["index"]].setdefault(e["kind"], e["t"])
    print("\n== phases (s)")
    if "process" in first and "spawn" in first:
        print(f"  process start to the first worker spawned (Python, imports) {first['spawn'] - t0:7.2f}")
    if "fleet_ready" in first:
        marks = [(label, first[kind] - first.get("spawn", t0)) for label, kind in
                 (("GPU checked", "gpu_checked"), ("databases open", "tune"), ("kernels imported", "kernels_imported"))
                 if kind in first]
        opened = f" ({', '.join(f'{label} at {t:.2f}' for label, t in marks)})" if marks else ""
        print(f"  start workers  {first['fleet_ready'] - first.get('spawn', t0):7.2f}{opened}")
    if "identified" in first:
        print(f"  identify       {first['identified'] - first['fleet_ready']:7.2f}")
    for p in problems:
        loaded = p.get("study_loaded", p["begin"])
        searched = p.get("searched", loaded)
        confirmed = p.get("confirmed", searched)
        print(f"  {p['label']}: from {p['begin'] - t0:.2f}: study {loaded - p['begin']:.2f}, "
              f"search {searched - loaded:.2f}, confirm {confirmed - searched:.2f}")
    if problems and "fleet_closed" in first:
        last = max(p.get("confirmed", p["begin"]) for p in problems)
        print(f"  close workers  {first['fleet_closed'] - last:7.2f}")

    # -- workers starting: spawned (by the parent), its process started, imports done (ready), CUDA and Triton warm
    spawned, started, ready, warmed = {}, {}, {}, {}
    for e in events:
        w = e.get("worker")
        if e["kind"] == "spawn":
            spawned.setdefault(w, e["t"])
        elif e["kind"] == "worker_ready":
            ready.setdefault(w, e["t"])
            if e.get("started"):
                started.setdefault(w, e["started"])
        elif e["kind"] == "warmed":
            warmed.setdefault(w, e["t"])
    if ready:
        print("\n== workers starting (s from the run's start: median / last)")
        for role in ("run", "compile"):
            names = [w for w in spawned if w.startswith(role)]
            cells = []
            for label, marks in (("spawned", spawned), ("process started", started), ("imports done", ready),
                                 ("warm", warmed)):
                ts = [marks[w] - t0 for w in names if w in marks]
                if ts:
                    cells.append(f"{label} {statistics.median(ts):.2f} / {max(ts):.2f}")
            if cells:
                print(f"  {len(names)} {role}: " + ", ".join(cells))

    # -- workers
    intervals = busy_intervals(events)
    runners = sorted(w for w in intervals if w.startswith("run"))
    print("\n== runners: seconds in each request (count)")
    for w in runners:
        per = collections.defaultdict(lambda: [0.0, 0])
        for a, b, request in intervals[w]:
            per[request][0] += b - a
            per[request][1] += 1
        print(f"  {w}: " + ", ".join(f"{r} {s:.2f} ({n})" for r, (s, n) in sorted(per.items())))
    compilers = [w for w in intervals if w.startswith("compile")]
    if compilers:
        total = sum(b - a for w in compilers for a, b, _ in intervals[w])
        count = sum(len(intervals[w]) for w in compilers)
        print(f"  {len(compilers)} compile workers: {total:.2f} s in {count} requests")

    print("\n== runners in each search: busy share of its wall time; idle gaps between a reply and the next request")
    for p in problems:
        lo, hi = p.get("study_loaded", p["begin"]), p.get("searched")
        if hi is None:
            continue
        cells = []
        for w in runners:
            mine = [iv for iv in intervals[w] if iv[1] > lo and iv[0] < hi]
            busy = overlap(mine, lo, hi)
            gaps = [b[0] - a[1] for a, b in zip(mine, mine[1:]) if b[0] > a[1]]
            gap = (f", gaps median {statistics.median(gaps) * 1e3:.0f} ms, total {sum(gaps):.2f} s"
                   if gaps else "")
            cells.append(f"{w} {busy / max(hi - lo, 1e-9):.0%}{gap}")
        print(f"  {p['label']}: " + "; ".join(cells))

    if problems and "identified" in first:
        lo = first["identified"]
        hi = max(p.get("confirmed", p["begin"]) for p in problems)
        print(f"\n== runners idle from the device read to the last result ({hi - lo:.2f} s)")
        for w in runners:
            print(f"  {w}: idle {hi - lo - overlap(intervals[w], lo, hi):.2f} s")

    retimed = [e for e in events if e["kind"] == "retimed" and e.get("rounds_ms")]
    if retimed:
        print("\n== re-timings: runners; per finalist its round medians (ms), the winner first")
        for e in retimed:
            label = problems[e["index"]]["label"] if e["index"] < len(problems) else e["index"]
            order = sorted(range(len(e["configs"])), key=lambda i: statistics.median(e["rounds_ms"][i]))
            print(f"  {label} ({'extra rounds for the closest' if e.get('extra') else ', '.join(e['runners'])})")
            for i in order:
                ms = e["rounds_ms"][i]
                print(f"    {' '.join(f'{m:.4f}' for m in ms)}  spread {max(ms) / min(ms) - 1:5.1%}  {e['configs'][i]}")

    # -- the parent
    spans = collections.defaultdict(list)
    for e in events:
        if "s" in e and "worker" not in e:
            spans[e["kind"]].append(e["s"])
    runs = sum(1 for w in runners for iv in intervals[w] if iv[2] == "Run")
    print("\n== the parent's own work")
    for kind, values in sorted(spans.items()):
        print(f"  {kind:8s} {sum(values):7.2f} s in {len(values):4d}, mean {statistics.mean(values) * 1e3:6.1f} ms"
              f", {sum(values) / max(runs, 1) * 1e3:6.1f} ms per run")
    print(f"  ({runs} runs)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

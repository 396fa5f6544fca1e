"""Dev trace (needs trace.patch): every program's start, end and SM in one paged_prefill launch, read from
%globaltimer and %smid, for the probe's mixed batch (64 decode rows at 4096 + a 2048 chunk over 8192) and for its two
parts alone, at a few configs; rows to $OUT/trace.csv (run, pid, start_us, end_us, sm, n_new), a summary printed."""
import csv
import os
import statistics
import sys
import torch
sys.path.insert(0, "bench")
import paged_prefill_probe as probe
from tunebench.kernels import paged_prefill as pp
from tunebench.tune.timing import graph_bench

dev = "cuda" if torch.cuda.is_available() else "cpu"
s = probe.ISSUE if dev == "cuda" else probe.SMALL
m = probe.mixed_batch(s, dev)
runs = {"mixed": m.packed, "chunk": m.chunk_args, "decode": m.decode_prefill_args}
CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st) for bm, bn, w, st in
           ((64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 2), (64, 32, 4, 4))]
heads = s.Hq // s.Hkv
out_dir = os.environ.get("OUT", "/tmp")
rows = []
for c in CONFIGS:
    for name, args in runs.items():
        n_prog = (args[0].shape[0] // max(1, c["BLOCK_M"] // heads) + args[4].shape[0] - 1) * s.Hkv
        trace = torch.zeros(n_prog * 4, dtype=torch.int64, device=dev)
        f = lambda args=args, c=c: pp.launch(*args, config=c, check_values=False)
        ms = graph_bench(f, rep=50).median_ms if dev == "cuda" else 0.0
        for _ in range(3):
            pp.launch(*args, config=c, check_values=False, _trace=trace)
        if dev == "cuda":
            torch.cuda.synchronize()
        t = trace.view(-1, 4).cpu()
        ran = t[:, 1] > 0
        t0 = int(t[ran, 0].min()) if ran.any() else 0
        dur = {"decode": [], "chunk": []}
        for pid in range(t.shape[0]):
            if not ran[pid]:
                continue
            a, b, sm, n = (int(x) for x in t[pid])
            rows.append(dict(run=f"{name} {c['BLOCK_M']},{c['BLOCK_N']},{c['num_warps']},{c['num_stages']}", pid=pid,
                             start_us=(a - t0) / 1e3, end_us=(b - t0) / 1e3, sm=sm, n_new=n))
            dur["decode" if n == 1 else "chunk"].append((b - a) / 1e3)
        span = (int(t[ran, 1].max()) - t0) / 1e3 if ran.any() else 0.0
        desc = ", ".join(f"{k} {len(v)} programs median {statistics.median(v):.1f} us (p90 "
                         f"{sorted(v)[int(0.9 * (len(v) - 1))]:.1f})" for k, v in dur.items() if v)
        print(f"{name:6s} {c}: graph {ms:.4f} ms, traced span {span:.1f} us; {desc}", flush=True)
        mine = [r for r in rows if r["run"].startswith(name + " ") and r["run"].endswith(
            f"{c['BLOCK_M']},{c['BLOCK_N']},{c['num_warps']},{c['num_stages']}")]
        for kind in ("decode", "chunk"):
            sel = [r for r in mine if (r["n_new"] == 1) == (kind == "decode")]
            if sel:
                busy = sum(r["end_us"] - r["start_us"] for r in sel)
                first, last = min(r["start_us"] for r in sel), max(r["end_us"] for r in sel)
                print(f"    {kind}: starts {first:.1f}-{max(r['start_us'] for r in sel):.1f} us, last end {last:.1f} us,"
                      f" {busy / max(span, 1e-9):.1f} programs resident on average over the span", flush=True)
with open(os.path.join(out_dir, "trace.csv"), "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["run"])
    w.writeheader()
    w.writerows(rows)

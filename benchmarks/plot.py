"""Re-draws `tunebench bench`'s PNG plots from a saved bench.csv (the device machine returns few files), using the
same plotting functions. Usage: python benchmarks/plot.py CSV OUT_DIR COPY_TB_S [DTYPE=TFLOPS ...]"""
import csv
import sys
from pathlib import Path

from tunebench.bench.measure import Ceilings
from tunebench.bench.plots import plot_roofline, plot_throughput

INTS = ("B", "Hq", "Hkv", "Nq", "Nk", "D")
NUMERIC = INTS + ("median_ms", "throughput", "tflops", "intensity")


def load(path):
    rows = []
    for r in csv.DictReader(open(path)):
        for k in NUMERIC:
            r[k] = (int if k in INTS else float)(r[k]) if r.get(k) not in (None, "") else None
        r["causal"] = r["causal"] in ("True", "true", "1")
        r["peer"] = r["peer"] in ("True", "true", "1")
        rows.append(r)
    return rows


if __name__ == "__main__":
    csv_path, out, copy_tb, *rates = sys.argv[1:]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ceilings = Ceilings(float(copy_tb) * 1e12, {d: float(t) * 1e12 for d, t in (x.split("=") for x in rates)})
    rows = [r for r in load(csv_path) if r["status"] == "ok"]
    print(plot_throughput(rows, out), plot_roofline(rows, ceilings, out))

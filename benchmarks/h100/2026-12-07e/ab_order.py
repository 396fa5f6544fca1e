"""Dev A/B (not shipped as a bench step): the mixed batch of bench/paged_prefill_probe.py (64 decode rows at 4096 + a
2048 chunk over 8192, bf16 Hq32/Hkv8 D128 page 16) as one paged_prefill launch per config and per launch ORDER
(0 group by group, 1 both ends in turn, 2 row-major), beside the two launches' parts (the chunk alone and the decode
rows alone in paged_prefill, the decode rows in paged_attention); every output checked against the float64
reference windows first, all graph-timed in this one process."""
import sys
import torch
sys.path.insert(0, "bench")
import paged_prefill_probe as probe
from tunebench.kernels import paged_attention as pa, paged_prefill as pp
from tunebench.tune.timing import graph_bench

dev = "cuda" if torch.cuda.is_available() else "cpu"
s = probe.ISSUE if dev == "cuda" else probe.SMALL
R = s.decode_rows
decode, chunk = [(1, s.decode_context)] * R, [s.mixed_chunk]
qs, ks, vs, packed = probe.dense_and_paged(s, decode + chunk, dev, seed=7)
q, kc, vc, tables, cu, lens = packed
nb = -(-s.decode_context // s.page)
d_args = (q[:R], kc, vc, tables[:R, :nb].contiguous(), lens[:R])
dp_args = (q[:R], kc, vc, tables[:R, :nb].contiguous(), cu[:R + 1], lens[:R])
c_args = (q[R:], kc, vc, tables[R:], cu[R:] - R, lens[R:])
bench = (lambda f: graph_bench(f, rep=100).median_ms) if dev == "cuda" else (lambda f: (f(), 0.0)[1])
PP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in
      ((64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (32, 64, 4, 3))]
PA = [dict(pa.DEFAULT, BLOCK_N=n, PARTITION=p) for n, p in ((32, 512), (64, 1024))]
rows = {}
for c in PP:
    line = {}
    for order in pp.SPACE["ORDER"]:
        cfg = dict(c, ORDER=order)
        f = lambda cfg=cfg: pp.launch(*packed, config=cfg, check_values=False)
        ratio = probe.check(f(), qs, ks, vs, decode + chunk, s.check_rows)
        assert ratio <= 1.0, (cfg, ratio)
        line[f"one{order}"] = rows[(f"one{order}", str(c))] = bench(f)
    cfg = dict(c, ORDER=0)
    line["chunk"] = rows[("chunk", str(c))] = bench(lambda: pp.launch(*c_args, config=cfg, check_values=False))
    line["decode_pp"] = rows[("decode_pp", str(c))] = bench(lambda: pp.launch(*dp_args, config=cfg,
                                                                              check_values=False))
    print(c, {k: round(v, 4) for k, v in line.items()}, flush=True)
for c in PA:
    rows[("decode", str(c))] = bench(lambda c=c: pa.launch(*d_args, config=c))
    print(c, round(rows[("decode", str(c))], 4), flush=True)
names = sorted({n for n, _ in rows})
best = {k: min(v for (n, _), v in rows.items() if n == k) for k in names}
two = best["chunk"] + best["decode"]
print("best:", {k: round(v, 4) for k, v in best.items()})
print(f"two launches (best chunk + best paged_attention decode) = {two:.4f} ms; one launch vs two: "
      + ", ".join(f"ORDER {o} {two / max(best[f'one{o}'], 1e-9):.3f}x" for o in pp.SPACE["ORDER"])
      + f"; perfect overlap bound {two / max(best['chunk'], best['decode'], 1e-9):.3f}x")

"""Which KV page size to give the cache: predicted decode time weighed with the KV memory lost in last blocks.

The page size is a layout the allocator fixes for the whole cache, so it is chosen once for a geometry (KV heads,
head dim, dtype) and a workload, from the paged kernel's winners at each page size (issue 19):

- **Time.** For each decode shape of the workload (a preset's decode grid, a record file's paged buckets, or, with
  neither, every decode bucket tuned for the geometry), at each page size that has winners: the exact winner's time
  when that bucket was tuned at that page, else the shape's K/V bytes at the bandwidth (GB/s) of the nearest tuned
  bucket at that page. The page's time is the sum over the workload, weighted by calls.
- **Waste.** A decoding sequence grows one token per step, so its length is uniform modulo the page: its last block
  holds (page - 1) / 2 empty slots on average. Waste % is those slots over all the slots the workload's sequences
  hold, weighted by batch x calls.
- **Weighing them.** With the cache full, memory wasted is memory that holds no other sequence: the batch that fits
  shrinks by the waste fraction, so the time per decoded token grows by 1 / (1 - waste). The pick minimises
  time / (1 - waste), ties to the smaller page. This only matters where times are close: 128-token pages waste
  under 2% at 4k contexts, but 30% at 256-token ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..shapes import PAGED_KERNELS, Problem, bucket, bucket_distance, bucket_key

TOKEN_BUDGET = 1 << 20          # tokens of KV the "blocks" column counts pages for, unless one is given


@dataclass(frozen=True)
class PageRow:
    page: int
    tuned: int                  # decode buckets tuned at this page for the geometry
    exact: int                  # workload shapes with an exact winner at this page (the rest are scaled)
    time_ms: float              # predicted decode time over the workload, ms (weighted by calls)
    waste_pct: float            # expected empty slots in last blocks, % of the slots the workload holds
    blocks: int                 # pages of this size for the token budget
    cost: float                 # time_ms / (1 - waste): what the pick minimises


@dataclass(frozen=True)
class PageReport:
    rows: list[PageRow]         # by page size
    pick: int | None            # None: no paged winner for this geometry
    workload: list[tuple[Problem, int]]
    token_budget: int

    def table(self) -> str:
        if not self.rows:
            return "no paged winners for this geometry: nothing to recommend (tune with `tunebench tune --suite pages`)"
        best = min(r.cost for r in self.rows)
        lines = [f"{'page':>5}{'tuned':>7}{'exact':>7}{'time ms':>11}{'waste %':>9}{'blocks':>10}{'cost':>9}",
                 *(f"{r.page:>5}{r.tuned:>7}{r.exact:>7}{r.time_ms:>11.4f}{r.waste_pct:>9.2f}{r.blocks:>10}"
                   f"{r.cost / best:>8.3f}x{'  <- pick' if r.page == self.pick else ''}" for r in self.rows)]
        return "\n".join(lines)


def recommend(winners, kv_heads: int, head_dim: int, dtype: str, workload: list[tuple[Problem, int]] | None = None,
              token_budget: int = TOKEN_BUDGET, kv_dtype: str | None = None) -> PageReport:
    """The page-size table and pick for a geometry from ``winners`` (runtime.winners.Winners: ``exact`` and
    ``times``). ``workload``: (decode Problem, calls) pairs; their page is ignored (every page is weighed). The
    cache's dtype is part of the geometry: ``kv_dtype`` (None: dtype) picks its winners and workload only."""
    tuned: dict[int, list[tuple[Problem, float]]] = {}
    for key, (problem, _config, _origin) in winners.exact.items():
        same = (problem.kernel in PAGED_KERNELS and problem.Hkv == kv_heads and problem.D == head_dim
                and problem.dtype == dtype and problem.kv_dtype == kv_dtype)
        if same and key in winners.times:
            tuned.setdefault(problem.page, []).append((problem, winners.times[key]))
    if workload is None:
        shapes = {(p.B, p.Hq, p.Nk): p for group in tuned.values() for p, _ in group}     # once, whatever the page
        workload = [(p, 1) for p in shapes.values()]
    workload = [(p, n) for p, n in workload
                if p.paged and p.Hkv == kv_heads and p.D == head_dim and p.dtype == dtype and p.kv_dtype == kv_dtype]
    rows = [_row(page, tuned[page], workload, token_budget) for page in sorted(tuned)] if workload else []
    pick = min(rows, key=lambda r: (r.cost, r.page)).page if rows else None
    return PageReport(rows, pick, workload, token_budget)


def _row(page: int, tuned: list[tuple[Problem, float]], workload, token_budget: int) -> PageRow:
    time_ms, exact, empty, slots = 0.0, 0, 0.0, 0.0
    by_key = {bucket_key(p): ms for p, ms in tuned}
    for shape, calls in workload:
        at_page = bucket(Problem(shape.kernel, shape.B, shape.Hq, shape.Hkv, 1, shape.Nk, shape.D, shape.dtype,
                                 page=page, kv_dtype=shape.kv_dtype))
        ms = by_key.get(bucket_key(at_page))
        if ms is None:
            near, near_ms = min(tuned, key=lambda t: (bucket_distance(at_page, t[0]), bucket_key(t[0])))
            ms = near_ms * at_page.kv_bytes / near.kv_bytes          # the nearest bucket's bandwidth
        else:
            exact += 1
        time_ms += calls * ms
        empty += calls * shape.B * (page - 1) / 2
        slots += calls * shape.B * (shape.Nk + (page - 1) / 2)
    waste = empty / slots
    return PageRow(page, len(tuned), exact, time_ms, 100 * waste, math.ceil(token_budget / page),
                   time_ms / (1 - waste))

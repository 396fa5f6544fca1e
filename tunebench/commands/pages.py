"""`tunebench pages`: the KV page-size table (predicted decode time, waste %, blocks) per page size with winners, and
the page it recommends, for a preset's decode grid or a recorded workload (runtime/pages.py says how they weigh)."""
from __future__ import annotations

from ..shapes import DEFAULT_PAGE, PRESETS, preset_problems


def pages_command(args) -> int:
    from ..registry import known_kernels
    from ..runtime import record
    from ..runtime.pages import recommend
    from ..runtime.winners import Winners, current_device_name, database_urls
    from ..store import resolve_url
    if bool(args.preset) == bool(args.from_record):
        raise ValueError("give --preset NAME or --from-record FILE (one of them)")
    if args.preset:
        p = PRESETS.get(args.preset)
        if p is None:
            raise KeyError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
        workload = [(q, 1) for q in preset_problems(args.preset, ("paged_attention",), args.dtype, page=DEFAULT_PAGE)]
    else:
        workload = [(q, n) for q, n in record.load(args.from_record, known_kernels()) if q.paged]
        if not workload:
            raise ValueError(f"{args.from_record}: records no paged_attention call")
    device = args.device or current_device_name()
    winners = Winners.load(device, [resolve_url(args.db)] if args.db else database_urls())
    for kv_heads, head_dim, dtype in sorted({(q.Hkv, q.D, q.dtype) for q, _ in workload}):
        report = recommend(winners, kv_heads, head_dim, dtype, workload, args.tokens)
        calls = sum(n for _, n in report.workload)
        print(f"{device}: KV heads {kv_heads}, head dim {head_dim}, {dtype}; {len(report.workload)} decode shapes, "
              f"{calls} calls; blocks for {args.tokens} tokens")
        print(report.table())
        if report.pick is not None:
            print(f"recommended page size: {report.pick} (BlockAllocator reads it for this geometry)\n")
    return 0

"""What the dispatcher would run for the shapes the default presets meet, read from a results database: an exact
winner, a safe transfer (tunebench.runtime.transfer), or DEFAULT. No GPU is needed: it reads the stored winners and
trials of the named device, as tunebench.flash_attention / paged_attention would on that device.

    python3 bench/coverage.py --db results.db --device "NVIDIA H200"

The grid per preset: prefill (flash_v2, causal, bf16) at B 1-64 x N 512-32k with B x N <= 64k tokens, and decode
(paged_attention, bf16, page 16) at B 1-256 x context 1k-128k with B x context <= shapes.DECODE_MAX_TOKENS, every
power of two. It counts buckets, not calls: how often each shape runs is a workload's, not this script's, to say.
"""
from __future__ import annotations

import argparse
import collections

PREFILL_MAX_TOKENS = 1 << 16


def preset_grid(name: str):
    from tunebench.shapes import DECODE_MAX_TOKENS, PRESETS, Problem
    p = PRESETS[name]
    pow2 = [1 << i for i in range(18)]
    prefill = [Problem("flash_v2", b, p["Hq"], p["Hkv"], n, n, p["D"], "bfloat16", causal=True)
               for b in pow2 if b <= 64 for n in pow2 if 512 <= n <= 32768 and b * n <= PREFILL_MAX_TOKENS]
    decode = [Problem("paged_attention", b, p["Hq"], p["Hkv"], 1, n, p["D"], "bfloat16", page=16)
              for b in pow2 if b <= 256 for n in pow2 if 1024 <= n <= 131072 and b * n <= DECODE_MAX_TOKENS]
    return prefill, decode


def source(winners, problem) -> str:
    """How the dispatcher would pick this problem's config: "exact", "transfer", "DEFAULT, tuned neighbours" (enough
    tuned buckets nearby, and none of their configs beat DEFAULT in each by the margin: the evidence says DEFAULT),
    or "DEFAULT, no evidence" (too few tuned buckets nearby to say)."""
    from tunebench.registry import kernel_module
    from tunebench.runtime import transfer
    from tunebench.shapes import family
    module = kernel_module(problem.kernel)
    default = dict(module.DEFAULT)
    choice = winners.choose(problem, default, lambda c: module.keep(c, problem) is None)
    if choice is not None:
        return "exact" if choice.why.startswith("exact") else "transfer"
    near = transfer.neighbours(problem, list(winners.evidence.get(family(problem), {}).values()), default)
    return "DEFAULT, tuned neighbours" if len(near) >= transfer.MIN_NEIGHBOURS else "DEFAULT, no evidence"


def main() -> int:
    from tunebench.runtime.winners import Winners
    from tunebench.shapes import DEFAULT_PRESETS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="results database path or URL")
    parser.add_argument("--device", default="NVIDIA H200", help="the device name the winners were tuned on")
    parser.add_argument("--preset", action="append", help="presets to cover (default: shapes.DEFAULT_PRESETS)")
    args = parser.parse_args()
    from tunebench.store import resolve_url
    winners = Winners.load(args.device, urls=[resolve_url(args.db)])
    total = collections.Counter()
    print(f"{'preset':14s} {'phase':8s} {'buckets':>7s} {'exact':>6s} {'transfer':>8s} {'DEFAULT (tuned nearby)':>22s} "
          f"{'DEFAULT (no evidence)':>21s}")
    for name in args.preset or DEFAULT_PRESETS:
        for phase, problems in zip(("prefill", "decode"), preset_grid(name)):
            counts = collections.Counter(source(winners, p) for p in problems)
            total.update(counts)
            print(f"{name:14s} {phase:8s} {len(problems):7d} {counts['exact']:6d} {counts['transfer']:8d} "
                  f"{counts['DEFAULT, tuned neighbours']:22d} {counts['DEFAULT, no evidence']:21d}")
    n = sum(total.values())
    print(f"all: {n} buckets: exact {total['exact'] / n:.0%}, safe transfer {total['transfer'] / n:.0%}, "
          f"DEFAULT where tuned neighbours found nothing safer {total['DEFAULT, tuned neighbours'] / n:.0%}, "
          f"DEFAULT without evidence {total['DEFAULT, no evidence'] / n:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

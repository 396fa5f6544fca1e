"""Safe transfer: the config to run on a bucket that was not tuned, chosen from the stored evidence.

The nearest tuned bucket's winner was chosen for another wave count and can lose a third to DEFAULT (issue 17). So a
config is transferred only where the trials of the neighbouring tuned buckets say it is safe:
- the neighbours are the NEIGHBOURS nearest tuned buckets of the same family (kernel, dtype, head dim, causality,
  page size), in the features that decide which config wins: the number of (batch, head) programs, the query and key
  lengths, and the GQA group, each in log2 steps; at least MIN_NEIGHBOURS of them, none further than MAX_DISTANCE;
- a candidate is any config with an ok trial in every one of them, that `keep` admits for the call;
- it is safe when it beat DEFAULT in each neighbour by at least MARGIN (DEFAULT's time / its time);
- of the safe ones, the one whose smallest gain is largest runs. With none, DEFAULT runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..registry import config_key
from ..shapes import Problem, bucket_key, family

NEIGHBOURS = 3
MIN_NEIGHBOURS = 2
MAX_DISTANCE = 6.0
MARGIN = 1.02          # trials are timed one at a time, a few % apart run to run: a "win" must clear that


@dataclass
class Evidence:
    """One tuned bucket's ok trials: the best median per config, and DEFAULT's."""
    bucket: Problem
    ms: dict[tuple, float] = field(default_factory=dict)
    configs: dict[tuple, dict] = field(default_factory=dict)

    def add(self, config: dict, median_ms: float) -> None:
        key = config_key(config)
        if median_ms > 0 and math.isfinite(median_ms) and median_ms < self.ms.get(key, math.inf):
            self.ms[key], self.configs[key] = median_ms, dict(config)


@dataclass(frozen=True)
class Transfer:
    config: dict
    neighbours: tuple[Problem, ...]
    gains: tuple[float, ...]            # DEFAULT's time / the config's time, per neighbour

    def why(self) -> str:
        each = ", ".join(f"{bucket_key(n)} ({g:.2f}x)" for n, g in zip(self.neighbours, self.gains))
        return f"transferred from buckets {each}: faster than DEFAULT in each"


def features(problem: Problem) -> tuple[float, ...]:
    programs = problem.B * (problem.Hkv if problem.paged else problem.Hq)
    return (math.log2(programs), math.log2(problem.Nq), math.log2(problem.Nk), math.log2(problem.group))


def distance(a: Problem, b: Problem) -> float:
    if family(a) != family(b):
        return math.inf
    return sum(abs(x - y) for x, y in zip(features(a), features(b)))


def neighbours(problem: Problem, evidence: list[Evidence], default: dict) -> list[Evidence]:
    """The nearest tuned buckets of the problem's family that timed DEFAULT, nearest first."""
    dkey = config_key(default)
    timed = [e for e in evidence if dkey in e.ms]
    near = sorted(timed, key=lambda e: (distance(problem, e.bucket), bucket_key(e.bucket)))
    return [e for e in near[:NEIGHBOURS] if distance(problem, e.bucket) <= MAX_DISTANCE]


def choose(problem: Problem, evidence: list[Evidence], default: dict,
           admits: Callable[[dict], bool]) -> Transfer | None:
    """The safe config for an untuned bucket (see the module docstring), or None: run DEFAULT."""
    near = neighbours(problem, evidence, default)
    if len(near) < MIN_NEIGHBOURS:
        return None
    dkey = config_key(default)
    common = set.intersection(*(set(e.ms) for e in near)) - {dkey}
    best = None
    for key in sorted(common):
        gains = tuple(e.ms[dkey] / e.ms[key] for e in near)
        if min(gains) < MARGIN or not admits(near[0].configs[key]):
            continue
        rank = (min(gains), sum(map(math.log, gains)))
        if best is None or rank > best[0]:
            best = (rank, Transfer(near[0].configs[key], tuple(e.bucket for e in near), gains))
    return best[1] if best else None

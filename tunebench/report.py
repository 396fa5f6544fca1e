"""What tuning produced, read from a results database, as text: `tunebench report` and `tunebench show` print it.

Per device: each winner with its speedup over the kernel's DEFAULT (and over the best peer, when the tuner measured
one), its trials' outcomes, and the time spent tuning it (first trial start to last trial end, and the sum of trial
durations), and, per bucket that flash_v3 has a winner for, which kernel variant="auto" runs there; then totals by
status and a PNG of the speedups. A winner whose kernel source has changed since is marked
stale: the dispatcher ignores it.

Only collect() needs the kernels (their SPACE and identity); the formatting helpers import none, so that
`tunebench show` lists rows without loading Triton.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

from .registry import REPLACES, config_key, replacement_runs
from .shapes import bucket_key
from .store import Store, Winner
from .text import format_config, format_counts, format_duration, format_speedup, printable, table


@dataclass
class WinnerLine:
    winner: Winner
    counts: dict[str, int]
    span: timedelta | None          # first trial started -> last trial finished
    busy: timedelta | None          # sum of the trials' own durations
    stale: bool
    vs_next: float | None = None    # the best other ok config's trial time / the winner's (how much the search found)


def tuning_times(trials) -> tuple[timedelta | None, timedelta | None]:
    """(wall span, sum of trial durations) from trial timestamps; None where no trial has both."""
    timed = [t for t in trials if t.started_at and t.finished_at]
    if not timed:
        return None, None
    span = max(t.finished_at for t in timed) - min(t.started_at for t in timed)
    busy = sum((t.finished_at - t.started_at for t in timed), timedelta())
    return span, busy


def collect(store: Store) -> tuple[list[WinnerLine], dict[str, int]]:
    """Every winner with its trials' counts and times, and the status totals over all trials."""
    from .registry import checked_config, kernel_identity
    current: dict[str, str | None] = {}
    lines = []
    for w in store.winners(check_config=checked_config):
        if w.kernel not in current:
            try:
                current[w.kernel] = kernel_identity(w.kernel)
            except ImportError:
                current[w.kernel] = None
        trials = store.trials(kernel=w.kernel, source_hash=w.source_hash, problem=w.problem, device_name=w.device)
        counts = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        span, busy = tuning_times(trials)
        lines.append(WinnerLine(w, counts, span, busy, current[w.kernel] != w.source_hash, margin(w, trials)))
    lines.sort(key=lambda x: (x.winner.device, x.winner.kernel, x.winner.problem.label()))
    return lines, store.trial_counts()


def margin(w: Winner, trials) -> float | None:
    """The fastest ok trial of any config but the winner's, over the winner's fastest trial: single timings, so a
    figure within a few % of 1.0 says the space holds nothing clearly better or worse near the top."""
    best: dict[str, float] = {}
    for t in trials:
        if t.status == "ok" and t.median_ms:
            key = config_key(t.config)
            best[key] = min(best.get(key, t.median_ms), t.median_ms)
    own = best.pop(config_key(w.config), None)
    return min(best.values()) / own if own and best else None


def headroom(lines: list[WinnerLine]) -> list[str]:
    """Per kernel: the median gain over DEFAULT and over the runner-up, and a plain word where little is left."""
    out = []
    for kernel in sorted({x.winner.kernel for x in lines}):
        mine = [x for x in lines if x.winner.kernel == kernel]
        gains = [x.winner.speedup_vs_default for x in mine if x.winner.speedup_vs_default]
        nexts = [x.vs_next for x in mine if x.vs_next]
        if not gains:
            continue
        line = f"{kernel}: tuned over DEFAULT median {_median(gains):.2f}x"
        line += f", over the runner-up config median {_median(nexts):.2f}x" if nexts else ""
        if _median(gains) < 1.02:
            line += " - the space has little left over DEFAULT here: a wider space (kernel structure) is needed"
        out.append(line)
    return out


AUTO_COLUMNS = ["bucket", "kernel", "winner ms", "replaced kernel", "its winner ms", "timed beside it",
                "variant='auto' runs"]


def auto_choices(lines: list[WinnerLine]) -> list[list[str]]:
    """Per bucket of one device that a replacing kernel (flash_v3, registry.REPLACES) has a current winner for: its
    time, the replaced kernel's (flash_v2's) winner time, its speedup over the replaced kernel's config timed beside
    it when it was tuned, and the kernel variant="auto" runs there on that device (registry.replacement_runs: by that
    speedup where it was measured, else the faster winner; the replaced kernel where it has no winner to compare; in
    eager calls, not where its winner is under registry.EAGER_MIN_MS).
    Stale winners are left out, as the dispatcher leaves them out."""
    current = {(x.winner.device, x.winner.kernel, bucket_key(x.winner.problem)): x.winner for x in lines if not x.stale}
    rows = []
    for (device, kernel, key), w in current.items():
        if kernel not in REPLACES:
            continue
        replaced = REPLACES[kernel]
        other = current.get((device, replaced, bucket_key(replace(w.problem, kernel=replaced))))
        other_ms = other.median_ms if other else None
        runs = kernel if replacement_runs(w.speedup_vs_peer, w.median_ms, other_ms) else replaced
        in_graph = kernel if replacement_runs(w.speedup_vs_peer, w.median_ms, other_ms, captured=True) else replaced
        if in_graph != runs:
            runs = f"{runs} (eager; {in_graph} in a CUDA graph)"
        rows.append([w.problem.label().removeprefix(f"{kernel} "), kernel, f"{w.median_ms:.4f}", replaced,
                     f"{other.median_ms:.4f}" if other else "no winner", format_speedup(w.speedup_vs_peer), runs])
    return rows


def device_label(w: Winner) -> str:
    """The device a winner was measured on, with the versions that measured it."""
    note = "" if w.is_speed_measurement else " [interpreter: not a speed measurement]"
    return printable(f"{w.device} (capability {w.capability}, torch {w.torch}, triton {w.triton}){note}")


def winner_record(w: Winner) -> dict:
    """A winner as plain JSON values: one element of `show --json`'s "winners" (and, with more fields, report's)."""
    return {"device": w.device, "capability": w.capability, "torch": w.torch, "triton": w.triton,
            "speed_measurement": w.is_speed_measurement, "kernel": w.kernel, "source_hash": w.source_hash,
            "bucket": w.problem.label(), "problem": asdict(w.problem), "config": w.config, "median_ms": w.median_ms,
            "speedup_vs_default": w.speedup_vs_default, "speedup_vs_peer": w.speedup_vs_peer,
            "updated_at": w.updated_at.isoformat() if w.updated_at else None}


def report_record(lines: list[WinnerLine], totals: dict[str, int], where: str) -> dict:
    """`report --json`: each winner (winner_record) with its trial counts, tuning time in seconds (span: first start
    to last end; busy: the sum of trial durations), staleness and margin over the runner-up; then trial totals."""
    return {"db": where,
            "winners": [dict(winner_record(x.winner), trials=x.counts, tuning_span_s=x.span, tuning_busy_s=x.busy,
                             stale=x.stale, vs_runner_up=x.vs_next) for x in lines],
            "trial_totals": totals}


REPORT_COLUMNS = ["kernel", "problem (bucket)", "config", "median ms", "vs DEFAULT", "vs runner-up", "vs peer", "trials",
                  "tuning time"]


def _row(x: WinnerLine) -> list[str]:
    w = x.winner
    return [w.kernel + (" (stale: kernel changed)" if x.stale else ""), w.problem.label(), format_config(w.config),
            f"{w.median_ms:.4f}", format_speedup(w.speedup_vs_default), format_speedup(x.vs_next),
            format_speedup(w.speedup_vs_peer), format_counts(x.counts),
            f"{format_duration(x.span)} (trials {format_duration(x.busy)})"]


def format_report(lines: list[WinnerLine], totals: dict[str, int], where: str) -> str:
    out = [f"# tunebench report: {where}", ""]
    if not lines:
        out.append("No winners stored.")
    devices = list(dict.fromkeys(x.winner.device for x in lines))
    for device in devices:
        mine = [x for x in lines if x.winner.device == device]
        out += [f"## {device_label(mine[0].winner)}", "", table(REPORT_COLUMNS, [_row(x) for x in mine], markdown=True)]
        spans = [x.span for x in mine if x.span is not None]
        speedups = [x.winner.speedup_vs_default for x in mine if x.winner.speedup_vs_default]
        out += ["", f"{len(mine)} winners; tuning time {format_duration(sum(spans, timedelta()) if spans else None)}"
                + (f"; speedup over DEFAULT: median {_median(speedups):.2f}x, best {max(speedups):.2f}x, "
                   f"worst {min(speedups):.2f}x" if speedups else ""), ""]
        out += [f"- {line}" for line in headroom(mine)] + [""]
        choices = auto_choices(mine)
        if choices:
            out += ["### Which kernel variant='auto' runs per bucket", "", table(AUTO_COLUMNS, choices, markdown=True),
                    ""]
    total = sum(totals.values())
    out += ["## Trials by status (all devices)", "",
            f"{total} trials: {format_counts(totals)}" if total else "no trials stored"]
    return "\n".join(out) + "\n"


def _median(xs: list[float]) -> float:
    import statistics
    return statistics.median(xs)


def plot_speedups(lines: list[WinnerLine], path: Path) -> Path | None:
    """Horizontal bars of speedup over DEFAULT per winner (1.0 marked), one colour per device."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [x for x in lines if x.winner.speedup_vs_default is not None]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(shown) + 1.5))
    devices = list(dict.fromkeys(x.winner.device for x in shown))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, x in enumerate(shown):
        ax.barh(i, x.winner.speedup_vs_default, color=colours[devices.index(x.winner.device) % len(colours)])
    ax.set_yticks(range(len(shown)), [x.winner.problem.label() for x in shown], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xlabel("speedup of the tuned config over DEFAULT")
    ax.set_title("tuned winners vs DEFAULT" + (f" ({', '.join(devices)})" if len(devices) <= 2 else ""))
    # Patches, not empty bars: an empty bar container's legend entry took the default colour for every device.
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=colours[i % len(colours)], label=d) for i, d in enumerate(devices)], fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")     # "tight": long problem labels are not clipped
    plt.close(fig)
    return path


"""`tunebench bench`'s plots: throughput against length per provider, and every point under the measured roof.
Skipped (empty results) when matplotlib is not installed."""
from __future__ import annotations

from pathlib import Path

from .measure import Ceilings


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_throughput(rows_: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per group of problems that differ only in length: throughput against sequence length per provider."""
    plt = _pyplot()
    if plt is None:
        return []
    groups: dict[tuple, list[dict]] = {}
    for r in rows_:
        if r["throughput"] is None or r.get("ragged"):      # a ragged batch has no one length to plot against
            continue
        key = (r["phase"], r["dtype"], r["Hq"], r["Hkv"], r["D"], r["causal"]) + ((r["B"],) if r["phase"] == "prefill"
                                                                                  else ())
        groups.setdefault(key, []).append(r)
    paths = []
    for key, rs in groups.items():
        phase, dtype, hq, hkv, d, causal = key[:6]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for provider in dict.fromkeys(r["provider"] for r in rs):
            pts = sorted((r["Nk"], r["throughput"]) for r in rs if r["provider"] == provider)
            peer = next(r["peer"] for r in rs if r["provider"] == provider)
            ax.plot(*zip(*pts), marker="o", label=provider, linestyle="--" if peer else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)" if phase == "decode" else "sequence length N")
        ax.set_ylabel(rs[0]["unit"])
        batch = f" B{key[6]}" if phase == "prefill" else " (batch varies)"
        title = f"{phase} {dtype}{batch} H{hq}/{hkv} D{d}{' causal' if causal else ''}"
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        path = out_dir / ("throughput_" + title.replace(" ", "_").replace("/", "-") + ".png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_roofline(rows_: list[dict], ceilings: Ceilings | None, out_dir: Path) -> Path | None:
    """Every timed point at its arithmetic intensity (FLOPs per minimum byte) and achieved TFLOP/s, under the
    measured roof min(matmul rate, intensity x copy bandwidth)."""
    plt = _pyplot()
    pts = [r for r in rows_ if r["tflops"]]
    if plt is None or not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    if ceilings is not None:
        import numpy as np
        peak = max(ceilings.matmul_flops_per_s.values()) / 1e12
        x = np.logspace(0, 4.5, 200)
        ax.plot(x, np.minimum(peak, x * ceilings.copy_bytes_per_s / 1e12), color="black", lw=1.5,
                label=f"roof: {peak:.0f} TFLOP/s, {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s (measured)")
    markers = "os^vD<>pP*Xh"
    for i, provider in enumerate(dict.fromkeys(r["provider"] for r in pts)):
        rs = [r for r in pts if r["provider"] == provider]
        ax.scatter([r["intensity"] for r in rs], [r["tflops"] for r in rs], s=18, marker=markers[i % len(markers)],
                   label=provider)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs / minimum byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("roofline: every measured point")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    path = out_dir / "roofline.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The one definition of "close enough", used by the tests, `tunebench check` and the tuner's check stage.

A kernel's output passes when its max error against the float64 reference is at most ``FACTOR`` times the max error
of the same naive computation done in the kernel's dtype, plus a small absolute slack. NaN never passes. This is the
rule of FlashAttention's own tests (FACTOR = 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FACTOR = 2.0
# Absolute slack per dtype: about a tenth of an ulp at 1.0, so that a kernel whose error is as small as the naive
# computation's is not failed by a ratio of two tiny numbers.
ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-5}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    err: float          # max |out - ref64|
    allowed: float      # FACTOR * max |naive_lowp - ref64| + atol
    reason: str = ""

    @property
    def ratio(self) -> float:
        """Error relative to the tolerance: <= 1 passes."""
        return self.err / self.allowed if self.allowed > 0 else math.inf


def close_enough(out: torch.Tensor, ref64: torch.Tensor, naive_lowp: torch.Tensor) -> Verdict:
    """Checks a kernel output against the float64 reference, with the naive low-precision error as the yardstick."""
    if out.shape != ref64.shape:
        return Verdict(False, math.inf, 0.0, f"shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    allowed = FACTOR * (naive_lowp.double() - ref64).abs().max().item() + ATOL[out.dtype]
    diff = out.double() - ref64
    n_nan = int(torch.isnan(diff).sum())
    if n_nan:
        return Verdict(False, math.nan, allowed, f"{n_nan} of {diff.numel()} outputs are NaN (unwritten or overflow)")
    err = diff.abs().max().item() if diff.numel() else 0.0
    if not err <= allowed:
        return Verdict(False, err, allowed, f"max error {err:.3g} > allowed {allowed:.3g}")
    return Verdict(True, err, allowed)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fills an output with NaN before a launch, so that any element the kernel leaves unwritten fails the check."""
    return t.fill_(math.nan)

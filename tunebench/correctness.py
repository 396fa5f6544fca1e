"""The one definition of "close enough", used by the tests, `tunebench check` and the tuner's check stage.

A kernel's output passes when its max error against the float64 reference is at most ``FACTOR`` times the max error
of the same naive computation done in the kernel's dtype, plus a small absolute slack. NaN never passes. This is the
rule of FlashAttention's own tests (FACTOR = 2).

An fp8 KV cache (paged decode with float8_e4m3fn or float8_e5m2 K/V and the caller's scales) is held to the same
rule, with the references taken on the dequantised cache (tunebench.paged_inputs.fp8_paged_references):
- ref64 is the float64 attention over stored value * scale, computed exactly in float64;
- naive_lowp is the same naive attention done in the query's dtype on those dequantised values (each rounded once to
  the query's dtype), and ATOL is that of the output's dtype, which is the query's.
Why this is the right yardstick: quantising to fp8 (3 or 2 mantissa bits, errors of several percent) happens when
the cache is written; after that the cache's values are fixed, and the kernel and both references read exactly those
values. So the quantisation error is the cache's, not the decode kernel's: measuring against the original fp16
values would bury a kernel bug under it. What remains is the decode's own arithmetic, which is that of a q-dtype
kernel: every fp8 value converts exactly to fp16, bf16 and fp32, and the kernel applies the scales in fp32 (K's with
the score scale, V's on the fp32 accumulator), at least as accurately as the naive computation, which rounds every
dequantised value to the query's dtype. The round trip of the quantisation itself is checked apart, bit for bit,
against the reference quantiser (reference/quantize.py).
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

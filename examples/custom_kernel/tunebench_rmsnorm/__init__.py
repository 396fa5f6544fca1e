"""RMSNorm through tunebench's dispatcher: the config tuned for this GPU and this call's bucket, else DEFAULT.

    from tunebench_rmsnorm import rms_norm
    y = rms_norm(x, weight)          # x [B, N, D], weight [D]
"""
from __future__ import annotations

import tunebench
from tunebench.shapes import Problem

from . import kernel

NAME = "rmsnorm"                     # the entry point's name in pyproject.toml


def problem_of(x) -> Problem:
    """The Problem of a call: B rows of N tokens of width D (the fields of Problem this kernel reads)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got shape {tuple(x.shape)}")
    B, N, D = x.shape
    return Problem(NAME, B, 1, 1, N, N, D, str(x.dtype).removeprefix("torch."))


def rms_norm(x, weight, eps: float = 1e-6, out=None):
    return kernel.launch(x, weight, config=tunebench.tuned_config(problem_of(x)), eps=eps, out=out)

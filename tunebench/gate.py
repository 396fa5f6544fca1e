"""The correctness gate behind `tunebench check` and the test suite: Hypothesis draws shapes *and* configs, and every
case must pass tunebench.correctness.close_enough against the float64 reference.

A case is (problem, config, seed, layout), and a failing one is printed as the `tunebench check` line that replays
it. The layout is 'bhnd' (contiguous) or 'bnhd' (strided views): for a dense case, [B, N, H, D] storage viewed
through .transpose(1, 2); for a paged case, q sliced from a fused QKV tensor and K/V the halves of one
[num_blocks, 2, ...] cache, as a serving engine lays them out.

Uses the GPU when there is one, else the Triton interpreter (which must be switched on before a kernel is imported).
"""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import asdict, dataclass, field

import torch

from .bounds import checked_if_interpreted
from .correctness import Verdict, close_enough, poison
from .inputs import DomainWorkload, draw_qkv, references
from .paged_inputs import paged_inputs, paged_prefill_inputs, paged_prefill_references, paged_references
from .kernel_protocol import is_domain_kernel
from .registry import BUILT_IN, kernel_module, module_path
from .shapes import Problem
from .shapes import PAGED_PREFILL_KERNELS
from .text import format_config, table

LAYOUTS = ("bhnd", "bnhd")


def use_interpreter_without_gpu() -> str:
    """Switches on the Triton interpreter when there is no GPU. Returns the device to run on."""
    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def check_dense_case(problem: Problem, config: dict, device, seed: int = 0, layout: str = "bhnd") -> Verdict:
    """One flash_v1/flash_v2 case: fresh random inputs, a NaN-poisoned output, the float64 and naive references."""
    q, k, v = draw_qkv(problem, device, seed, layout)
    out = poison(torch.empty(problem.B, problem.Hq, problem.Nq, problem.D, dtype=q.dtype, device=device))
    kernel_module(problem.kernel).launch(q, k, v, config=config, causal=problem.causal, out=out)
    return close_enough(out, *references(q, k, v, problem.causal))


def check_paged_case(problem: Problem, config: dict, device, seed: int = 0, layout: str = "bhnd") -> Verdict:
    """One paged-decode case: pages of problem.page tokens in random order, per-sequence lengths up to problem.Nk;
    layout 'bnhd' gives strided views."""
    args = paged_inputs(problem, device, seed, strided=layout == "bnhd")
    out = poison(torch.empty_like(args[0]))
    kernel_module(problem.kernel).launch(*args, config=config, out=out)
    return close_enough(out, *paged_references(*args))


def check_paged_prefill_case(problem: Problem, config: dict, device, seed: int = 0, layout: str = "bhnd") -> Verdict:
    """One paged prefill case: a ragged batch (problem.Nq new tokens and problem.Nk in all for the first sequence,
    decode rows, idle rows and shorter chunks for the others) over pages of problem.page tokens in random order;
    layout 'bnhd' gives strided views of every tensor, the integer ones included."""
    args = paged_prefill_inputs(problem, device, seed, strided=layout == "bnhd")
    out = poison(torch.empty_like(args[0]))
    kernel_module(problem.kernel).launch(*args, config=config, out=out)
    return close_enough(out, *paged_prefill_references(*args))


def check_case(problem: Problem, config: dict, device, seed: int = 0, layout: str = "bhnd") -> Verdict:
    """One case of any registered kernel. A kernel of another domain builds its own inputs and reference
    (tunebench.kernel_protocol; the layout is attention's and does not apply to it)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    module = kernel_module(problem.kernel)
    check = check_paged_case if problem.paged else check_dense_case
    if problem.kernel in PAGED_PREFILL_KERNELS:
        check = check_paged_prefill_case
    with checked_if_interpreted():       # under the interpreter, a load or store out of bounds fails the case
        if is_domain_kernel(module):
            return DomainWorkload(problem, module, seed, device).check(module, config)
        return check(problem, config, device, seed, layout)


def repro_command(problem: Problem, config: dict, seed: int, layout: str) -> str:
    """The `tunebench check` line that replays a case; a user's kernel is named with its module, so that the line
    works where the kernel is not installed as an entry point."""
    shape = {k: v for k, v in asdict(problem).items() if k != "kernel"}
    own = [] if problem.kernel in BUILT_IN else ["--kernel-module", f"{problem.kernel}={module_path(problem.kernel)}"]
    return " ".join(["tunebench", "check", *own, "--kernel", problem.kernel, "--shape", shlex.quote(json.dumps(shape)),
                     "--config", shlex.quote(json.dumps(config)), "--seed", str(seed), "--layout", layout])


@dataclass
class Case:
    """One example the gate ran: what it was, the command that replays it, how long it took, and why it failed."""
    name: str
    repro: str
    seconds: float
    failure: str | None = None      # None: passed


@dataclass
class GateStats:
    kernel: str
    examples: int = 0
    configs: set = field(default_factory=set)
    worst_ratio: float = 0.0
    failures: list = field(default_factory=list)      # (repro command, reason)
    cases: list = field(default_factory=list)         # every Case, in the order run (Hypothesis's shrinking too)

    def add_case(self, problem: Problem, config: dict, seed: int, layout: str, seconds: float, verdict,
                 error: str | None):
        """Counts one example; returns why it failed, or None. `error` is a crash of the launch itself."""
        self.examples += 1
        self.configs.add(json.dumps(config, sort_keys=True))
        failure = error or (None if verdict.ok else verdict.reason)
        repro = repro_command(problem, config, seed, layout)
        self.cases.append(Case(f"{problem.label()} {format_config(config)} seed={seed} {layout}", repro, seconds,
                               failure))
        if failure:
            self.failures.append((repro, failure))
        else:
            self.worst_ratio = max(self.worst_ratio, verdict.ratio)
        return failure

    def as_record(self) -> dict:
        """The kernel's line of `check --json`."""
        return {"kernel": self.kernel, "examples": self.examples, "configs": len(self.configs),
                "worst_ratio": self.worst_ratio, "ok": not self.failures,
                "failures": [{"repro": cmd, "reason": reason} for cmd, reason in self.failures]}


def run_kernel_gate(kernel: str, device, examples: int | None) -> GateStats:
    """Runs Hypothesis over one kernel's problems and admitted configs; collects stats instead of stopping early."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from .strategies import DEFAULT_EXAMPLES, configs, problems

    stats = GateStats(kernel)
    mod = kernel_module(kernel)

    @settings(max_examples=examples or DEFAULT_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data):
        problem = data.draw(problems(kernel), label="problem")
        config = data.draw(configs(mod, problem), label="config")
        seed = data.draw(st.integers(0, 2**16), label="seed")
        layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
        start, verdict, error = time.perf_counter(), None, None
        try:
            verdict = check_case(problem, config, device, seed, layout)
        except Exception as e:                        # noqa: BLE001 - a crashing launch fails its case, with a repro
            error = f"{type(e).__name__}: {e}"
        failure = stats.add_case(problem, config, seed, layout, time.perf_counter() - start, verdict, error)
        if failure:
            raise AssertionError(failure)

    try:
        one()
    except Exception as e:                            # noqa: BLE001 - any failure is reported, never swallowed
        if not stats.failures:
            stats.failures.append(("(no case recorded)", f"{type(e).__name__}: {e}"))
    return stats


def format_table(all_stats: list[GateStats]) -> str:
    """One line per kernel, then each failing kernel's shrunk case and the command that replays it."""
    lines = [table(["kernel", "examples", "configs", "worst err/tol", "failures"],
                   [[s.kernel, s.examples, len(s.configs), f"{s.worst_ratio:.3f}", len(s.failures)]
                    for s in all_stats], right=(1, 2, 3, 4))]
    for s in all_stats:
        if s.failures:
            cmd, reason = s.failures[-1]          # Hypothesis replays the shrunk case last
            lines.append(f"\nFAIL {s.kernel}: {reason}\n  reproduce: {cmd}")
    return "\n".join(lines)

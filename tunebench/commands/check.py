"""`tunebench check`: the correctness gate over every kernel, or the replay of one case a failing gate printed."""
from __future__ import annotations

import dataclasses
import json
import os

from ..registry import known_kernels, register_modules, require_kernels


def check_command(args) -> int:
    register_modules(args.kernel_module)
    require_kernels(args.kernel)
    if args.examples is not None and args.examples < 1:
        raise ValueError(f"--examples must be >= 1, got {args.examples}")
    if args.shape or args.config:
        if not (args.shape and args.config and args.kernel and len(args.kernel) == 1):
            raise ValueError("--shape and --config replay one case: give both, with exactly one --kernel")
        return replay(args.kernel[0], _shape(args.shape), _json_object("--config", args.config), args.seed,
                      args.layout)
    return run_gate(args.kernel or list(known_kernels()), profile=args.profile, examples=args.examples)


def _shape(text: str) -> dict:
    from ..shapes import Problem
    fields = [f for f in dataclasses.fields(Problem) if f.name != "kernel"]
    shape = _json_object("--shape", text)
    unknown = set(shape) - {f.name for f in fields}
    missing = {f.name for f in fields if f.default is dataclasses.MISSING} - set(shape)
    if unknown or missing:
        raise ValueError(f"--shape has unknown fields {sorted(unknown)} and lacks {sorted(missing)}; a shape has "
                         f"{[f.name for f in fields]}")
    return shape


def _json_object(flag: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


def run_gate(kernels: list[str], profile: str | None = None, examples: int | None = None) -> int:
    if profile:
        os.environ["TUNEBENCH_PROFILE"] = profile
    from ..gate import format_table, run_kernel_gate, use_interpreter_without_gpu
    device = use_interpreter_without_gpu()
    profile = os.environ.get("TUNEBENCH_PROFILE") or ("gpu" if device == "cuda" else "cpu")
    print(f"tunebench check: device={device}{' (Triton interpreter)' if device == 'cpu' else ''}, profile={profile}")
    all_stats = [run_kernel_gate(k, device, examples) for k in kernels]
    print(format_table(all_stats))
    return 1 if any(s.failures for s in all_stats) else 0


def replay(kernel: str, shape: dict, config: dict, seed: int, layout: str) -> int:
    """Replays one case, as printed by a failing gate."""
    from ..gate import check_case, use_interpreter_without_gpu
    from ..registry import kernel_module
    from ..shapes import Problem
    device = use_interpreter_without_gpu()
    problem = Problem(kernel=kernel, **shape)
    reason = kernel_module(kernel).keep(config, problem)
    if reason:
        print(f"config not admitted by keep(): {reason}")
        return 2
    verdict = check_case(problem, config, device, seed, layout)
    print(f"{problem.label()} {config}: {'ok' if verdict.ok else 'FAIL'} err={verdict.err:.3g} "
          f"allowed={verdict.allowed:.3g} {verdict.reason}")
    return 0 if verdict.ok else 1

"""`tunebench check`: the correctness gate over every kernel, or the replay of one case a failing gate printed.

Text on stdout by default; with --json one JSON document there instead (the header goes to stderr); with --junit FILE
the cases as JUnit XML too. Exit code 0 when every case passed, 1 when one failed, 2 for bad input.
"""
from __future__ import annotations

import dataclasses
import os
import sys

from ..registry import known_kernels, register_modules, require_kernels
from ..text import clip, loads_bounded, print_json
from . import FAILED, OK, USAGE

NO_HYPOTHESIS = ("`tunebench check` draws its cases with Hypothesis, which is not installed here: "
                 "pip install 'hypothesis>=6.100' (a dependency of tunebench that an install with --no-deps leaves "
                 "out)")


def check_command(args) -> int:
    register_modules(args.kernel_module)
    require_kernels(args.kernel)
    if args.examples is not None and args.examples < 1:
        raise ValueError(f"--examples must be >= 1, got {args.examples}")
    if args.shape or args.config:
        if not (args.shape and args.config and args.kernel and len(args.kernel) == 1):
            raise ValueError("--shape and --config replay one case: give both, with exactly one --kernel")
        if args.junit:
            raise ValueError("--junit writes the gate's cases: it does not go with a replay (--shape/--config)")
        return replay(args.kernel[0], _shape(args.shape), _config(args.kernel[0], args.config), args.seed,
                      args.layout, as_json=args.json)
    require_hypothesis()
    return run_gate(args.kernel or list(known_kernels()), profile=args.profile, examples=args.examples, as_json=args.json,
                    junit=args.junit)


def require_hypothesis() -> None:
    """A clear error, not a ModuleNotFoundError traceback, where Hypothesis is missing."""
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise RuntimeError(NO_HYPOTHESIS) from None


def _shape(text: str) -> dict:
    from ..shapes import Problem
    fields = [f for f in dataclasses.fields(Problem) if f.name != "kernel"]
    shape = _json_object("--shape", text)
    unknown = set(shape) - {f.name for f in fields}
    missing = {f.name for f in fields if f.default is dataclasses.MISSING} - set(shape)
    if unknown or missing:
        raise ValueError(f"--shape has unknown fields {sorted(unknown)} and lacks {sorted(missing)}; a shape has "
                         f"{[f.name for f in fields]}")
    for f in fields:
        expected, says = JSON_TYPES.get(str(f.type), (None, ""))
        if f.name in shape and expected and type(shape[f.name]) not in expected:
            raise ValueError(f"--shape field {f.name!r} must be {says}, got {clip(repr(shape[f.name]))}")
    return shape


# What a Problem field of each annotated type may be in JSON, by exact type: true is not an integer here.
JSON_TYPES = {"int": ((int,), "an integer"), "str": ((str,), "a string"), "bool": ((bool,), "true or false"),
              "int | None": ((int, type(None)), "an integer or null"),
              "str | None": ((str, type(None)), "a string or null")}


def _config(kernel: str, text: str) -> dict:
    """The --config of a replay: a JSON object whose keys and values are in the kernel's SPACE."""
    from ..registry import config_in_space, kernel_module
    config = _json_object("--config", text)
    why = config_in_space(kernel, config)
    if why:
        space = kernel_module(kernel).SPACE
        missing, unknown = sorted(set(space) - set(config)), sorted(set(config) - set(space))
        keys = (f"lacks {missing}" if missing else "") + (" and " if missing and unknown else "") + \
               (f"has unknown keys {unknown}" if unknown else "")
        raise ValueError(f"--config for {kernel} {keys or clip(why)}; {kernel}'s SPACE is {clip(space, 600)}")
    return config


def _json_object(flag: str, text: str) -> dict:
    try:
        value = loads_bounded(text, flag)
    except ValueError as e:  # json.JSONDecodeError is a ValueError, and so is a value over the bounds
        raise ValueError(f"{flag} is not JSON that tunebench reads ({clip(e)}): {clip(repr(text))}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {clip(repr(text))}")
    return value


def run_gate(kernels: list[str], profile: str | None = None, examples: int | None = None, as_json: bool = False,
             junit: str | None = None) -> int:
    if profile:
        os.environ["TUNEBENCH_PROFILE"] = profile
    from ..gate import format_table, run_kernel_gate, use_interpreter_without_gpu
    device = use_interpreter_without_gpu()
    profile = os.environ.get("TUNEBENCH_PROFILE") or ("gpu" if device == "cuda" else "cpu")
    print(f"tunebench check: device={device}{' (Triton interpreter)' if device == 'cpu' else ''}, profile={profile}",
          file=sys.stderr if as_json else sys.stdout, flush=True)
    all_stats = [run_kernel_gate(k, device, examples) for k in kernels]
    ok = not any(s.failures for s in all_stats)
    if junit:
        from ..junit import write_junit
        write_junit(all_stats, junit, {"device": device, "profile": profile})
    if as_json:
        print_json("check", {"device": device, "interpreter": device == "cpu", "profile": profile, "ok": ok,
                             "kernels": [s.as_record() for s in all_stats]})
    else:
        print(format_table(all_stats))
    return OK if ok else FAILED


def replay(kernel: str, shape: dict, config: dict, seed: int, layout: str, as_json: bool = False) -> int:
    """Replays one case, as printed by a failing gate."""
    from ..gate import check_case, use_interpreter_without_gpu
    from ..registry import kernel_module
    from ..shapes import Problem
    device = use_interpreter_without_gpu()
    problem = Problem(kernel=kernel, **shape)
    reason = kernel_module(kernel).keep(config, problem)
    if reason:
        print(f"tunebench check: config not admitted by keep(): {reason}", file=sys.stderr)
        return USAGE
    verdict = check_case(problem, config, device, seed, layout)
    if as_json:
        print_json("check", {"device": device, "ok": verdict.ok, "replay": {
            "kernel": kernel, "problem": shape, "config": config, "seed": seed, "layout": layout, "ok": verdict.ok,
            "err": verdict.err, "allowed": verdict.allowed, "reason": verdict.reason}})
    else:
        print(f"{problem.label()} {config}: {'ok' if verdict.ok else 'FAIL'} err={verdict.err:.3g} "
              f"allowed={verdict.allowed:.3g} {verdict.reason}")
    return OK if verdict.ok else FAILED

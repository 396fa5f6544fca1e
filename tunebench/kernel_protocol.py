"""The kernel convention, written down once: what a kernel module defines, checked when it is registered.

Every kernel module (tunebench's own, a test's fake one, a user's) defines (KernelModule):
- ``launch(*args, config, out=None, **kwargs)``: validates its inputs and launches the ``@triton.jit`` kernel(s) with
  ``config``, writing into ``out`` when given; returns the output;
- ``SPACE``: the search space as plain data, ``{name: [values]}``;
- ``keep(config, problem)``: the reason a config is rejected for a problem before compiling, or None;
- ``DEFAULT``: a config of SPACE that is always valid.

Attention kernels take their inputs and float64 reference from tunebench.inputs (q, k, v [B, H, N, D], or a paged
cache). A kernel of another domain (RMSNorm, softmax, ...) describes its own (DomainKernelModule), reading from the
Problem the fields it needs (e.g. B rows of Nq tokens of width D, and dtype):
- ``make_inputs(problem, device, seed)`` -> ``(args, kwargs, out)``: fresh random inputs for ``launch`` (never
  zeros) and the output it writes into (tunebench poisons it with NaN before every launch);
- ``reference(*args, dtype, **kwargs)``: the plainest computation of the result in ``dtype``. tunebench calls it in
  float64 (the reference) and in the problem's dtype (the yardstick of tunebench.correctness.close_enough);
and may define:
- ``SHAPES``: ``{suite name: [shape]}``, the problems `tunebench tune --kernel NAME --suite S` tunes; a shape is a
  dict of Problem fields without ``kernel`` (Hq and Hkv default to 1, Nk to Nq);
- ``throughput(problem, ms)``: a figure of merit stored with each trial (default: none).
The gate draws such a kernel's problems as it draws dense attention shapes (B, Nq, D, dtype vary), and its configs
from SPACE through keep.
"""
from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any, Callable, Mapping, Protocol, Sequence

from .shapes import Problem


class KernelModule(Protocol):
    """The names every kernel module defines."""
    SPACE: Mapping[str, Sequence[Any]]
    DEFAULT: Mapping[str, Any]

    def launch(self, *args: Any, config: dict | None = None, out: Any = None, **kwargs: Any) -> Any: ...

    def keep(self, config: dict, problem: Problem) -> str | None: ...


class DomainKernelModule(KernelModule, Protocol):
    """A kernel of another domain than attention: it builds its own inputs and reference."""

    def make_inputs(self, problem: Problem, device: Any, seed: int) -> tuple[tuple, dict, Any]: ...

    def reference(self, *args: Any, dtype: Any, **kwargs: Any) -> Any: ...


class KernelModuleError(ValueError):
    """A module that does not follow the convention; the message names every missing or wrong name."""


DOMAIN_HOOKS = ("make_inputs", "reference")


def is_domain_kernel(module) -> bool:
    return hasattr(module, "make_inputs")


def check_module(module: ModuleType, name: str) -> None:
    """Raises KernelModuleError naming everything the module lacks or gets wrong, or returns None."""
    problems = [f"{attr}: {why}" for attr, why in _violations(module)]
    if problems:
        raise KernelModuleError(
            f"kernel {name!r} ({module.__name__}) does not follow the kernel convention "
            f"(tunebench.kernel_protocol.KernelModule): " + "; ".join(problems))


def _violations(module: ModuleType):
    for attr in _members(KernelModule):
        if not hasattr(module, attr):
            yield attr, f"missing ({_describe(attr)})"
    yield from _space_violations(getattr(module, "SPACE", None), getattr(module, "DEFAULT", None))
    yield from _callable_violations(module, "launch", required=("config", "out"))
    yield from _callable_violations(module, "keep", positional=2)
    hooks = [h for h in DOMAIN_HOOKS if hasattr(module, h)]
    if hooks and len(hooks) < len(DOMAIN_HOOKS):
        for attr in set(DOMAIN_HOOKS) - set(hooks):
            yield attr, f"missing: a kernel with {hooks[0]} needs both {' and '.join(DOMAIN_HOOKS)} " \
                        f"({_describe(attr, DomainKernelModule)})"
    if hooks:
        yield from _callable_violations(module, "make_inputs", positional=3)
        yield from _callable_violations(module, "reference", required=("dtype",))
    shapes = getattr(module, "SHAPES", None)
    if shapes is not None and not (isinstance(shapes, dict) and all(
            isinstance(v, (list, tuple)) and all(isinstance(s, dict) for s in v) for v in shapes.values())):
        yield "SHAPES", "must be a dict {suite name: [shape dict, ...]}"


def _space_violations(space, default):
    if space is not None and not (isinstance(space, dict) and space and all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and len(v) > 0 for k, v in space.items())):
        yield "SPACE", f"must be a non-empty dict {{name: [values]}}, got {space!r:.80}"
        return
    if space is None or default is None:
        return
    if not isinstance(default, dict) or set(default) != set(space):
        yield "DEFAULT", f"must be a dict over SPACE's keys {sorted(space)}, got {default!r:.80}"
        return
    outside = [f"{k}={v!r}" for k, v in default.items() if v not in space[k]]
    if outside:
        yield "DEFAULT", f"values not in SPACE: {', '.join(outside)}"


def _callable_violations(module, attr: str, required: Sequence[str] = (), positional: int = 0):
    fn = getattr(module, attr, None)
    if fn is None:
        return
    if not callable(fn):
        yield attr, f"must be a function ({_describe(attr)}), got {type(fn).__name__}"
        return
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return                  # a builtin or C function: nothing to read, trust it
    params = sig.parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        required = ()
    missing = [r for r in required if r not in sig.parameters]
    if missing:
        yield attr, f"takes no {' or '.join(missing)} argument ({_describe(attr, _declaring(attr))})"
    try:
        sig.bind(*range(positional)) if positional else None
    except TypeError:
        yield attr, f"cannot be called with {positional} positional arguments ({_describe(attr, _declaring(attr))})"


def _declaring(attr: str):
    return DomainKernelModule if attr in DOMAIN_HOOKS else KernelModule


def _members(protocol) -> list[str]:
    """The names a Protocol declares: annotated attributes and methods, in declaration order."""
    names = list(getattr(protocol, "__annotations__", {}))
    names += [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    return names


def _describe(attr: str, protocol=KernelModule) -> str:
    """The declaration of a member, as the Protocol writes it, for error messages."""
    annotation = getattr(protocol, "__annotations__", {}).get(attr)
    if annotation is not None:
        return f"{attr}: {annotation}"
    fn: Callable | None = getattr(protocol, attr, None)
    if fn is None:
        return attr
    params = list(inspect.signature(fn).parameters.values())[1:]          # without self
    return f"def {attr}({', '.join(str(p).replace(chr(39), '') for p in params)})"


def shapes_of(kernel: str, module, suite_name: str) -> list[Problem]:
    """The problems a module's SHAPES declares for a suite, as Problems of ``kernel``; [] if it declares none."""
    shapes = getattr(module, "SHAPES", None) or {}
    out = []
    for shape in shapes.get(suite_name, ()):
        fields = {"Hq": 1, "Hkv": 1, "Nk": shape.get("Nq"), **shape}
        try:
            out.append(Problem(kernel=kernel, **fields))
        except (TypeError, ValueError) as e:
            raise ValueError(f"kernel {kernel!r}: SHAPES[{suite_name!r}] has a bad shape {shape}: {e}") from None
    return out

"""The registry of kernels, and each kernel's identity.

A kernel is registered in one of three ways, and each maps a name to a module that follows the kernel convention
(tunebench.kernel_protocol, checked when the module is first imported):
- built in: flash_v2, flash_v1, paged_attention, paged_prefill (`KERNELS` below);
- an installed package's entry point in the group `tunebench.kernels` (``rmsnorm = "my_pkg.rmsnorm"``), found when
  a name is looked up (known_kernels); an entry point cannot take a built-in kernel's name;
- `--kernel-module [NAME=]pkg.mod` on `tunebench tune` and `tunebench check` (register_modules).
Names read from a database map through these registrations and the built-in device kernels (flash_v3, whose rows are
read on any machine and dispatched only on its device; `readable`), and nothing else is ever imported: a row naming
any other kernel is skipped, whatever module its name looks like.

A kernel's identity stamps every trial and winner: when it changes, the old winners are stale and are not
dispatched. It is a hash of the code that runs on the GPU and of the search space, nothing else:
- every `@triton.jit` function the module defines, and every jit function those reach through their globals
  (in any module), each as its syntax tree with the docstring dropped, so comments, docstrings, blank lines and
  line numbers do not count (Triton's own `JITFunction.cache_key` counts the starting line, so moving a function
  down a file would change it);
- the values of the plain constants (numbers, strings, tl.constexpr) that those functions read from their globals;
- `SPACE`.
Validation, launch glue, `keep` and `DEFAULT` are not part of it. A constant that `launch` passes to a kernel as a
`tl.constexpr` changes the compiled code without changing the identity: keep such values in SPACE, or in the
kernel's globals where the jit function reads them.
A module with no jit function (a kernel written in PyTorch, as the tests' fake kernels are) is identified by its
`launch` instead.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import textwrap
import warnings
from types import ModuleType

KERNELS = {
    "flash_v2": "tunebench.kernels.flash_v2",
    "flash_v1": "tunebench.kernels.flash_v1",
    "paged_attention": "tunebench.kernels.paged_attention",
    "paged_prefill": "tunebench.kernels.paged_prefill",
}
BUILT_IN = tuple(KERNELS)
# Built-in kernels that run on some devices only: registered when asked for by name (require_kernels, kernel_module)
# if their module's unavailable() returns None; otherwise the reason is kept, and require_kernels gives it. They are
# not in known_kernels() until then (so `tunebench check` without --kernel, and --help, neither import nor draw them),
# and flash_v3 (Gluon, sm_90) is never registered on a CPU, in the interpreter, or off Hopper.
DEVICE_KERNELS = {"flash_v3": "tunebench.kernels.flash_v3"}
# A kernel that the suites hold no problems for, because it replaces another where it can run: `tune --kernel
# flash_v3` tunes the suite's flash_v2 problems whose DEFAULT it keeps, and variant="auto" compares the two winners.
REPLACES = {"flash_v3": "flash_v2"}
UNAVAILABLE: dict[str, str] = {}
ENTRY_POINT_GROUP = "tunebench.kernels"
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")    # no '|' or '/': names go into bucket keys and study names
_state = {"entry_points_read": False, "checked": set()}


# A replacing kernel's winner faster than this on the GPU does not run in eager calls: its launch costs more host time
# than the replaced kernel's, and below this an eager call waits on the host, not the GPU. On an H200 (2026-12-07, one
# bench run through tunebench.flash_attention) flash_v3's winners at 0.056-0.071 ms (N 1k, B4 H16 D128 bf16) took
# 1.68-2.55x their CUDA-graph time launched one call at a time, flash_v2's 0.96-1.03x, so auto ran 0.67x and 0.45x
# flash_v2 there; at 0.168 ms and up (N 2k) launch by launch and graph agreed within 3% and flash_v3 won.
EAGER_MIN_MS = 0.15


def replacement_runs(versus_peer: float | None, ms: float | None, replaced_ms: float | None,
                     captured: bool = False) -> bool:
    """variant="auto"'s rule for a bucket, the one place it is written (runtime/dispatch.auto_kernel runs by it,
    report.auto_choices shows it): whether the replacing kernel's exact winner (ms) runs rather than the replaced
    kernel's (replaced_ms). By versus_peer, its speedup over the replaced kernel's config timed beside it when it was
    tuned (tune/confirm.py), where that was measured; else by the two winners' times from their own runs. A winner
    alone, never timed beside the replaced kernel, does not run: it is no evidence against the replaced kernel's
    DEFAULT (on an H100 at N 1k causal, flash_v3's lone winner took 1.06x flash_v2's DEFAULT time, graph-timed in one
    run, 2026-12-07). Nor does a winner under EAGER_MIN_MS in an eager call (``captured``: the call is being captured
    into a CUDA graph, whose replays pay no launch cost)."""
    if not captured and ms is not None and ms < EAGER_MIN_MS:
        return False
    if versus_peer is not None:
        return versus_peer >= 1.0
    return ms is not None and replaced_ms is not None and ms < replaced_ms


def known_kernels() -> dict[str, str]:
    """Every registered kernel, name -> module path: the built-in ones, those registered in this process, and the
    installed packages' entry points (read once)."""
    if not _state["entry_points_read"]:
        _state["entry_points_read"] = True
        _read_entry_points()
    return KERNELS


def registered(name: str) -> bool:
    """Whether a kernel of this name can run here: known_kernels(), or a device kernel (flash_v3) whose device this
    is, registered on this first ask."""
    if name not in known_kernels() and name in DEVICE_KERNELS and name not in UNAVAILABLE:
        _register_device_kernel(name)
    return name in KERNELS


def readable(name: str) -> bool:
    """Whether a database row naming this kernel can be read here: a registered kernel, or a built-in device kernel
    (flash_v3's H100 winners are listed and reported on any machine; they are dispatched only on their device). A
    row naming another is skipped: nothing else is imported."""
    return name in known_kernels() or name in DEVICE_KERNELS


def _reading_module(name: str, check: bool = True) -> ModuleType:
    """The module of a readable kernel, for its SPACE and identity: a device kernel's even where it cannot run;
    KeyError naming the registered kernels for another name."""
    if not readable(name):
        require_kernels([name])
    if name in KERNELS:
        return _import(name, KERNELS[name], check=check)
    return _import(name, DEVICE_KERNELS[name], check=False)


def _register_device_kernel(name: str) -> None:
    path = DEVICE_KERNELS[name]
    try:
        reason = importlib.import_module(path).unavailable()
    except ImportError as e:
        reason = f"its module {path} cannot be imported: {e}"
    if reason:
        UNAVAILABLE[name] = reason
    else:
        KERNELS.setdefault(name, path)


def _read_entry_points() -> None:
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        why = _name_problem(ep.name, ep.module)
        if ep.attr:
            why = f"its value {ep.value!r} must name a module (pkg.mod), not an attribute"
        if why:
            warnings.warn(f"tunebench: ignoring the {ENTRY_POINT_GROUP} entry point {ep.name!r} "
                          f"({getattr(ep.dist, 'name', '?')}): {why}", stacklevel=3)
            continue
        KERNELS.setdefault(ep.name, ep.module)


def _name_problem(name: str, path: str) -> str | None:
    if not NAME.fullmatch(name):
        return f"a kernel name is letters, digits, '_', '.' and '-' (starting with a letter or '_'), got {name!r}"
    if name in KERNELS and KERNELS[name] != path:
        return f"the name {name!r} is taken by {KERNELS[name]}"
    if name in DEVICE_KERNELS and DEVICE_KERNELS[name] != path:
        return f"the name {name!r} is taken by {DEVICE_KERNELS[name]}"
    return None


def register(name: str, module_path: str) -> ModuleType:
    """Registers ``module_path`` under ``name`` after importing it and checking it against the kernel convention;
    ValueError (KernelModuleError) says what is wrong."""
    known_kernels()
    why = _name_problem(name, module_path)
    if why:
        raise ValueError(f"cannot register kernel {name!r}: {why}")
    module = _import(name, module_path)
    KERNELS[name] = module_path
    return module


def register_modules(specs: list[str] | None) -> list[str]:
    """Registers each `--kernel-module` value, ``NAME=pkg.mod`` or ``pkg.mod`` (named after its last part); returns
    the names. The current directory is searched last, as ``python -m`` would search it first (the spawned workers
    inherit this process's path)."""
    if specs and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    names = []
    for spec in specs or ():
        name, _, path = spec.rpartition("=")
        name = name or path.rpartition(".")[2]
        register(name, path)
        names.append(name)
    return names


def require_kernels(names: list[str] | None) -> None:
    """KeyError naming every registered kernel if one of ``names`` is not registered."""
    unknown = [n for n in names or () if not registered(n)]
    if unknown and unknown[0] in UNAVAILABLE:
        raise KeyError(f"kernel {unknown[0]!r} is not available here: {UNAVAILABLE[unknown[0]]}")
    if unknown:
        raise KeyError(f"unknown kernel {unknown[0]!r}; registered: {', '.join(known_kernels())} (register your own "
                       f"with --kernel-module pkg.mod or an entry point in the group {ENTRY_POINT_GROUP!r})")


def declared_problems(kernels: list[str] | None, suite_name: str) -> list:
    """The problems that the named kernels' modules declare for a suite in their SHAPES (a user's kernel, which no
    built-in suite holds); [] for the built-in kernels."""
    from .kernel_protocol import shapes_of
    return [p for k in kernels or () if k not in BUILT_IN for p in shapes_of(k, kernel_module(k), suite_name)]


def module_path(name: str) -> str:
    """The path of a registered kernel's module, which a worker process imports."""
    require_kernels([name])
    return KERNELS[name]


def kernel_module(name: str) -> ModuleType:
    """The registered module of a kernel, imported and checked against the convention."""
    if name not in KERNELS:
        require_kernels([name])
    return _import(name, KERNELS[name])


def _import(name: str, path: str, check: bool = True) -> ModuleType:
    from .kernel_protocol import check_module
    try:
        module = importlib.import_module(path)
    except ImportError as e:
        raise ValueError(f"kernel {name!r}: cannot import its module {path!r}: {e}") from e
    if check and path not in _state["checked"]:
        check_module(module, name)
        _state["checked"].add(path)
    return module


def kernel_identity(name: str) -> str:
    """A short hash of the kernel's jit code and SPACE (see the module docstring); stored as `source_hash`."""
    module = _reading_module(name, check=False)          # only its code and SPACE count here
    jitted = {}
    for value in vars(module).values():
        if _is_jit(value) and value.fn.__module__ == module.__name__:
            _collect(value, module.__name__, jitted)
    if not jitted:
        code = {"launch": _normalized(module.launch)}
    else:
        code = {key: text for key, (text, _) in jitted.items()}
    constants = {f"{key}.{name}": repr(value) for key, (_, used) in jitted.items() for name, value in used.items()}
    blob = json.dumps({"code": code, "constants": constants, "space": repr(module.SPACE)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _is_jit(value) -> bool:
    from triton.runtime.jit import KernelInterface   # JITFunction, and InterpretedFunction under TRITON_INTERPRET=1
    return isinstance(value, KernelInterface) and callable(getattr(value, "fn", None))


def _collect(jit, home: str, found: dict) -> None:
    """Adds `jit` and the jit functions it reaches to `found` as {name: (normalized source, constants read)}.

    Functions of the kernel's own module (`home`) are keyed by name alone, so a copy of the module under another
    name has the same identity; those of other modules by module and name."""
    fn = jit.fn
    key = fn.__qualname__ if fn.__module__ == home else f"{fn.__module__}.{fn.__qualname__}"
    if key in found:
        return
    found[key] = (_normalized(fn), {})
    constants = {}
    for name in sorted(_global_names(fn)):
        value = fn.__globals__.get(name)
        if _is_jit(value):
            _collect(value, home, found)
        elif _is_constant(value):
            constants[name] = value
    found[key] = (found[key][0], constants)


# fn.__code__ -> (normalized text, global names read). A code object is immutable and a redefined function has a new
# one, so this is safe to keep for the process: it spares each problem of a tuning run the ~20 ms that parsing a
# kernel's jit functions takes (the simulated 8-worker fleet's runners idled while the parent did it).
_parsed: dict = {}


def _parse(fn) -> tuple[str, frozenset]:
    cached = _parsed.get(fn.__code__)
    if cached is None:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        names = frozenset(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load))
        node = tree.body[0]
        node.decorator_list = []
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        cached = _parsed[fn.__code__] = (ast.unparse(node), names)
    return cached


def _normalized(fn) -> str:
    """The function's syntax tree as text: no decorator, docstring, comment or layout."""
    return _parse(fn)[0]


def _global_names(fn) -> frozenset[str]:
    return _parse(fn)[1]


def _is_constant(value) -> bool:
    import triton.language as tl
    if isinstance(value, tl.constexpr):
        return True
    return isinstance(value, (bool, int, float, str)) and not isinstance(value, type)


def config_key(config: dict) -> tuple:
    """A config as a hashable key: the same for the same values in any key order."""
    return tuple(sorted(config.items()))


def config_in_space(name: str, config: dict) -> str | None:
    """Why a config (e.g. read from a database) is outside the kernel's SPACE, or None when every value is allowed.
    Membership is by value and type: JSON's 1 does not pass for True, nor 64.0 for 64."""
    space = _reading_module(name).SPACE
    if set(config) != set(space):
        return f"keys {sorted(config)} != SPACE keys {sorted(space)}"
    for key, value in config.items():
        if value not in space[key]:
            return f"{key}={value!r} is not in SPACE {space[key]}"
        if not any(type(value) is type(allowed) and value == allowed for allowed in space[key]):
            return f"{key}={value!r} has the wrong type"
    return None


def checked_config(name: str, config: dict) -> dict:
    """A config read from a database, in SPACE's key order; ValueError says why it cannot be used. This is the check
    that needs the kernel, which the store leaves to the dispatcher and `tunebench report`."""
    try:
        why = config_in_space(name, config)
        space = _reading_module(name).SPACE
    except (ImportError, ValueError) as e:
        raise ValueError(f"the kernel module cannot be used: {e}") from None
    if why:
        raise ValueError(f"config outside SPACE: {why}")
    return {key: config[key] for key in space}

"""The fixed registry of kernels, and each kernel's identity.

Names read from a database map through `KERNELS`, and nothing else is ever imported.

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
import textwrap
from types import ModuleType

KERNELS = {
    "flash_v2": "tunebench.kernels.flash_v2",
    "flash_v1": "tunebench.kernels.flash_v1",
    "paged_attention": "tunebench.kernels.paged_attention",
}


def kernel_module(name: str) -> ModuleType:
    if name not in KERNELS:
        raise KeyError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")
    return importlib.import_module(KERNELS[name])


def kernel_identity(name: str) -> str:
    """A short hash of the kernel's jit code and SPACE (see the module docstring); stored as `source_hash`."""
    module = kernel_module(name)
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


def _normalized(fn) -> str:
    """The function's syntax tree as text: no decorator, docstring, comment or layout."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    node = tree.body[0]
    node.decorator_list = []
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:] or [ast.Pass()]
    return ast.unparse(node)


def _global_names(fn) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _is_constant(value) -> bool:
    import triton.language as tl
    if isinstance(value, tl.constexpr):
        return True
    return isinstance(value, (bool, int, float, str)) and not isinstance(value, type)


def config_in_space(name: str, config: dict) -> str | None:
    """Why a config (e.g. read from a database) is outside the kernel's SPACE, or None when every value is allowed.
    Membership is by value and type: JSON's 1 does not pass for True, nor 64.0 for 64."""
    space = kernel_module(name).SPACE
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
        space = kernel_module(name).SPACE
    except ImportError as e:
        raise ValueError(f"the kernel module cannot be imported: {e}") from None
    if why:
        raise ValueError(f"config outside SPACE: {why}")
    return {key: config[key] for key in space}

"""The fixed registry of kernels. Names read from a database map through here, and nothing else is ever imported."""
from __future__ import annotations

import hashlib
import importlib
import inspect
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


def source_hash(name: str) -> str:
    """A short hash of the kernel module's source: when a kernel changes, its old winners go stale."""
    return hashlib.sha256(inspect.getsource(kernel_module(name)).encode()).hexdigest()[:16]


def config_in_space(name: str, config: dict) -> str | None:
    """Why a config (e.g. read from a database) is outside the kernel's SPACE, or None when every value is allowed."""
    space = kernel_module(name).SPACE
    if set(config) != set(space):
        return f"keys {sorted(config)} != SPACE keys {sorted(space)}"
    for key, value in config.items():
        if value not in space[key]:
            return f"{key}={value!r} is not in SPACE {space[key]}"
    return None

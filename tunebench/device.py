"""Which machine a measurement was taken on: every stored trial and winner carries a DeviceIdentity.

Light to import (no torch, no sqlalchemy): torch is imported only when the identity of this machine is read.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata

INTERPRETER_NAME = "cpu-interpreter"
NO_GPU_MESSAGE = "no GPU: use --interpret or run on a GPU"


@dataclass(frozen=True)
class DeviceIdentity:
    name: str                   # torch.cuda.get_device_name(), or "cpu-interpreter"
    capability: str             # "9.0", or "cpu"
    sm_count: int               # streaming multiprocessors (CPU cores under the interpreter)
    memory_bytes: int
    driver: str                 # NVIDIA driver version, or "unknown"
    torch: str
    triton: str
    is_speed_measurement: bool  # False under the interpreter: its times say nothing about a GPU

    @classmethod
    def current(cls, interpret: bool = False, device_index: int | None = None) -> "DeviceIdentity":
        """This machine: the CPU running the Triton interpreter, or the CUDA device (current one unless given)."""
        if interpret:
            return cls(INTERPRETER_NAME, "cpu", os.cpu_count() or 1, _host_memory_bytes(), "none",
                       _version("torch"), _version("triton"), is_speed_measurement=False)
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError(NO_GPU_MESSAGE)
        index = torch.cuda.current_device() if device_index is None else device_index
        props = torch.cuda.get_device_properties(index)
        return cls(props.name, f"{props.major}.{props.minor}", props.multi_processor_count, props.total_memory,
                   _driver_version(), torch.__version__, _version("triton"), is_speed_measurement=True)


def _version(package: str) -> str:
    module = sys.modules.get(package)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _driver_version() -> str:
    """The NVIDIA driver version, read from the kernel module's /proc file (cheap, no NVML needed), else NVML."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 ..." (or "Open Kernel Module for")
            found = re.search(r"\s(\d+\.\d+(?:\.\d+)?)\s", f.readline())
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        import pynvml
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # NVML missing or failing is not worth failing a tuning run over
        return "unknown"

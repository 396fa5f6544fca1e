"""Out-of-bounds memory accesses of Triton kernels run under the interpreter (TRITON_INTERPRET=1), made errors.

On a GPU an unmasked load past a tensor's end reads a neighbour's memory or faults, and a fault poisons the process's
CUDA context for every later call. Under the interpreter it reads whatever host memory lies there, silently (it read
zeros in a test): the CPU gate cannot see it. Inside ``checked()``, every load and store a kernel makes through a
pointer (masked lanes left out) must address an element of one of the tensors the launch passed it, else
``OutOfBounds`` names the kernel, the access and the nearest tensor argument.

An element of a tensor, not merely its storage: reading the neighbouring columns of a strided view (context_lens as
a column of a metadata tensor, issue 16's first finding) is an error here too. Block pointers and tensor
descriptors are bounds-checked by Triton itself and are not checked here.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np

# The interpreter's methods are patched for the whole process (checked()), so this state is the process's too: the
# kernels running now, innermost last, as (name, regions), and whether the patch is in place.
_state = SimpleNamespace(frames=[], active=False)


class OutOfBounds(AssertionError):
    """A kernel run under checked() addressed memory outside every tensor it was passed."""


class _Region:
    """The elements of one tensor argument: exact membership for any non-overlapping strides."""

    def __init__(self, name: str, tensor):
        self.name = name
        self.base = tensor.data_ptr()
        self.itemsize = tensor.element_size()
        dims = [(stride, size) for stride, size in zip(tensor.stride(), tensor.shape) if size > 1 and stride != 0]
        self.dims = sorted(dims, reverse=True)          # largest stride first: a greedy decomposition
        self.numel = tensor.numel()
        self.end = self.base + (sum((size - 1) * stride for stride, size in self.dims) + 1) * self.itemsize

    def contains(self, addresses: np.ndarray) -> np.ndarray:
        if self.numel == 0:
            return np.zeros(addresses.shape, dtype=bool)
        offset = addresses.astype(np.int64) - self.base
        ok = (offset >= 0) & (addresses < self.end) & (offset % self.itemsize == 0)
        rest = np.where(ok, offset // self.itemsize, 0)
        for stride, size in self.dims:
            index = rest // stride
            ok &= index < size
            rest = rest - index * stride
        return ok & (rest == 0)

    def describe(self, address: int) -> str:
        delta = (address - self.base) // self.itemsize
        span = (self.end - self.base) // self.itemsize
        return f"{self.name} (element offset {delta}; its elements span offsets 0..{span - 1})"


def _regions(arg_names, args, kwargs) -> list[_Region]:
    named = list(zip(arg_names, args)) + list(kwargs.items())
    return [_Region(name, value) for name, value in named if hasattr(value, "data_ptr") and hasattr(value, "stride")]


def _check(kind: str, ptrs, mask) -> None:
    if not _state.frames:
        return
    kernel, regions = _state.frames[-1]
    pointers = np.asarray(ptrs.data)
    active = np.broadcast_to(np.asarray(mask.data, dtype=bool), pointers.shape).reshape(-1)
    addresses = pointers.astype(np.uint64).reshape(-1)[active]
    if addresses.size == 0:
        return
    inside = np.zeros(addresses.shape, dtype=bool)
    for region in regions:
        inside |= region.contains(addresses)
    if inside.all():
        return
    bad = int(addresses[~inside][0])
    nearest = min(regions, key=lambda r: min(abs(bad - r.base), abs(bad - r.end)), default=None)
    where = f"; nearest argument: {nearest.describe(bad)}" if nearest else ""
    raise OutOfBounds(f"{kernel}: a {kind} of {int((~inside).sum())} of {addresses.size} unmasked lanes outside every "
                      f"tensor argument{where}")


@contextlib.contextmanager
def checked():
    """Within the block, a Triton kernel run under the interpreter raises OutOfBounds (wrapped by the interpreter
    in an InterpreterError whose message names it) on a load or store outside its tensor arguments."""
    from triton.runtime import interpreter as ti

    if _state.active:                        # already checked (a gate case run inside the test suite's check)
        yield
        return
    saved = (ti.GridExecutor._init_args_hst, ti.InterpreterBuilder.create_masked_load,
             ti.InterpreterBuilder.create_masked_store, ti.GridExecutor.__call__)
    init_args, masked_load, masked_store, call = saved

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _state.frames[-1] = (self.fn.__name__, _regions(self.arg_names, args_hst, kwargs_hst))
        return args_hst, kwargs_hst

    def run(self, *args, **kwargs):
        _state.frames.append((self.fn.__name__, []))
        try:
            return call(self, *args, **kwargs)
        finally:
            _state.frames.pop()

    def load(self, ptrs, mask, other, *rest):
        _check("load", ptrs, mask)
        return masked_load(self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        _check("store", ptrs, mask)
        return masked_store(self, ptrs, value, mask, *rest)

    _state.frames, _state.active = [], True
    ti.GridExecutor._init_args_hst, ti.GridExecutor.__call__ = init_args_hst, run
    ti.InterpreterBuilder.create_masked_load, ti.InterpreterBuilder.create_masked_store = load, store
    try:
        yield
    finally:
        _state.active = False
        (ti.GridExecutor._init_args_hst, ti.InterpreterBuilder.create_masked_load,
         ti.InterpreterBuilder.create_masked_store, ti.GridExecutor.__call__) = saved


def checked_if_interpreted():
    """checked() when the Triton interpreter is on (Triton's own reading of TRITON_INTERPRET), else nothing: compiled
    kernels are not instrumented (the GPU gate's fault is the check there)."""
    from .kernels._launch import interpreting
    return checked() if interpreting() else contextlib.nullcontext()

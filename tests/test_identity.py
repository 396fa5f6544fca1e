"""A kernel's identity follows the code that runs on the GPU: edits to docstrings, comments, validation or launch glue
leave it alone (so shipped winners stay valid), and any edit to a jit body or SPACE changes it."""
import pathlib

import pytest

import conftest  # noqa: F401  (sets TRITON_INTERPRET before any kernel is imported)
from tunebench import kernels, registry

KERNEL_DIR = pathlib.Path(registry.__file__).parent.parent / "kernels"


def identity_of(source: str, name: str, tmp_path, monkeypatch) -> str:
    """The identity of `source` imported as a kernel module beside the real ones (so `from ._launch import ...`
    resolves), under a name unique to this test (an imported module stays in sys.modules)."""
    module = f"{name}_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.setattr(kernels, "__path__", [*kernels.__path__, str(tmp_path)])
    monkeypatch.setitem(registry.KERNELS, name, f"{kernels.__name__}.{module}")
    return registry.kernel_identity(name)


def edited(kernel: str, old: str, new: str) -> str:
    source = (KERNEL_DIR / f"{kernel}.py").read_text()
    assert source.count(old) == 1, f"the edit's anchor {old!r} must occur once in {kernel}.py"
    return source.replace(old, new)


UNCHANGED = [  # (kernel, old text, new text): none of these touch compiled code
    ("flash_v2", '"""FlashAttention-2 forward', '"""A longer module docstring.\n\nFlashAttention-2 forward'),
    ("flash_v2", "def _check_inputs(q, k, v, out, causal, scale):\n",
     "def _check_inputs(q, k, v, out, causal, scale):\n    assert True, 'a new validation line'\n"),
    ("flash_v2", "        # -- load K (TMA zero-fills",
     "\n\n        # -- a new comment\n        # -- load K (TMA zero-fills"),
    ("flash_v2", "MASK_CAUSAL masks key j", "MASK_CAUSAL (reworded docstring) masks key j"),
    ("paged_attention", "def launch(", "def _a_new_helper():\n    return 1\n\n\ndef launch("),
]


@pytest.mark.parametrize("kernel, old, new", UNCHANGED)
def test_edits_outside_jit_code_keep_the_identity(kernel, old, new, tmp_path, monkeypatch):
    original = identity_of((KERNEL_DIR / f"{kernel}.py").read_text(), f"id_orig_{kernel}", tmp_path, monkeypatch)
    assert original == registry.kernel_identity(kernel)
    assert identity_of(edited(kernel, old, new), f"id_edit_{kernel}", tmp_path, monkeypatch) == original


CHANGED = [  # a jit body, a jit helper that a launched kernel calls, a constant a jit body reads, SPACE
    ("flash_v2", "offs_n = tl.arange(0, BLOCK_N)\n    offs_d", "offs_n = tl.arange(0, BLOCK_N) + 0\n    offs_d"),
    ("flash_v2", "tile = tl.load(ptrs)\n", "tile = tl.load(ptrs, cache_modifier='.cg')\n"),
    ("paged_attention", "SPACE = {", "SPACE = {'EXTRA': [1],"),
]


@pytest.mark.parametrize("kernel, old, new", CHANGED)
def test_edits_to_compiled_code_change_the_identity(kernel, old, new, tmp_path, monkeypatch):
    assert identity_of(edited(kernel, old, new), f"id_jit_{kernel}", tmp_path, monkeypatch) \
        != registry.kernel_identity(kernel)


def test_a_global_constant_read_by_a_jit_function_is_part_of_the_identity(tmp_path, monkeypatch):
    source = ("import triton\nimport triton.language as tl\nSCALE = {}\n\n\n@triton.jit\ndef _k(X):\n"
              "    tl.store(X, tl.load(X) * SCALE)\n\n\ndef launch(x, config=None):\n    pass\n\n\n"
              "SPACE = {{'A': [1]}}\n")
    one = identity_of(source.format(2.0), "id_const_a", tmp_path, monkeypatch)
    assert identity_of(source.format(2.0), "id_const_b", tmp_path, monkeypatch) == one
    assert identity_of(source.format(3.0), "id_const_c", tmp_path, monkeypatch) != one

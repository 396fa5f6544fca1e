"""The end-to-end decode loop (examples/generate.py): paged generation through tunebench equals a dense SDPA
reference token for token, with the prompt's blocks shared across samples."""
import importlib.util
import pathlib
import sys

import pytest

_spec = importlib.util.spec_from_file_location(
    "generate", pathlib.Path(__file__).resolve().parents[1] / "examples" / "generate.py")
generate = sys.modules["generate"] = importlib.util.module_from_spec(_spec)   # dataclasses look it up
_spec.loader.exec_module(generate)


def _check(r, n):
    assert r["tokens"] == r["expected"]
    assert len({tuple(t) for t in r["tokens"]}) == n           # the samples diverged: copy-on-write ran
    s = r["stats"]
    assert s.saved_blocks > 0 and s.used_blocks < s.unshared_blocks


def test_small_model_on_this_device(device):
    _check(generate.run(generate.SMALL, prompt_len=37, n=4, steps=6, device=device, num_blocks=64), 4)


@pytest.mark.gpu
def test_default_model_on_gpu():
    _check(generate.run(generate.ModelConfig(), prompt_len=200, n=4, steps=40, device="cuda", num_blocks=512), 4)

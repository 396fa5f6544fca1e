"""The checks every kernel shares (kernels/_launch.py): one interpreter rule, Triton's own, and the scale, causal and
config checks."""
import math

import pytest
import torch

from tunebench.kernels import cache_write, flash_v1, flash_v2, paged_attention
from tunebench.kernels._launch import check_causal, check_config, check_runnable, check_scale, interpreting

KERNELS = (flash_v1, flash_v2, paged_attention, cache_write)


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("TRUE", True), ("True", True), ("on", True),
                                       ("ON", True), ("yes", True), ("y", True), ("0", False), ("false", False),
                                       ("off", False), ("no", False), ("", False), ("2", False), (" 1", False)])
def test_interpreter_rule_is_tritons(monkeypatch, value, on):
    """TRITON_INTERPRET means the same to every kernel as to Triton (which picks interpreted or compiled at @jit)."""
    import triton
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is on
    assert triton.knobs.runtime.interpret is on
    cpu = torch.zeros(1)
    if on:
        check_runnable("q", cpu)
    else:
        with pytest.raises(ValueError, match="q is on cpu.*TRITON_INTERPRET=1"):
            check_runnable("q", cpu)


def test_interpreter_off_when_unset(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert interpreting() is False


def test_kernels_keep_no_private_interpreter_rule():
    for module in KERNELS:
        assert not hasattr(module, "_interpreting"), module.__name__


@pytest.mark.parametrize("scale, error", [(math.nan, ValueError), (math.inf, ValueError), (-math.inf, ValueError),
                                          (-1.0, ValueError), (0, ValueError), (-0.0, ValueError),
                                          (True, TypeError), ("0.1", TypeError), (torch.tensor(0.1), TypeError)])
def test_scale_must_be_a_finite_positive_number(scale, error):
    with pytest.raises(error, match="scale"):
        check_scale(scale)


@pytest.mark.parametrize("scale", [None, 0.125, 2, 1e-30])
def test_scale_accepts_numbers_and_none(scale):
    check_scale(scale)


@pytest.mark.parametrize("causal", [1, 0, "no", None])
def test_causal_must_be_a_bool(causal):
    with pytest.raises(TypeError, match="causal must be a bool"):
        check_causal(causal)


SPACE = {"BLOCK_N": [16], "num_warps": [4], "num_stages": [1]}


@pytest.mark.parametrize("config, error, match", [
    ([("BLOCK_N", 16)], TypeError, "must be a dict"),
    ({"BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "X": 1}, ValueError, "unknown keys.*X"),
    ({"BLOCK_N": 16, "num_warps": 4}, ValueError, "missing keys.*num_stages"),
    ({"BLOCK_N": 24, "num_warps": 4, "num_stages": 1}, ValueError, "BLOCK_N.*power of two >= 16"),
    ({"BLOCK_N": 8, "num_warps": 4, "num_stages": 1}, ValueError, "BLOCK_N"),
    ({"BLOCK_N": 16.0, "num_warps": 4, "num_stages": 1}, ValueError, "BLOCK_N"),
    ({"BLOCK_N": 16, "num_warps": 3, "num_stages": 1}, ValueError, "num_warps"),
    ({"BLOCK_N": 16, "num_warps": True, "num_stages": 1}, ValueError, "num_warps"),
    ({"BLOCK_N": 16, "num_warps": 4, "num_stages": 0}, ValueError, "num_stages"),
])
def test_check_config_rejects(config, error, match):
    with pytest.raises(error, match=match):
        check_config(config, SPACE, BLOCK_N=16)


def test_check_config_returns_a_valid_config_and_every_default_passes():
    config = {"BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    assert check_config(config, SPACE, BLOCK_N=16) is config
    for module in (flash_v1, flash_v2):
        check_config(module.DEFAULT, module.SPACE, BLOCK_M=16, BLOCK_N=16)
    assert paged_attention._check_config(paged_attention.DEFAULT) is paged_attention.DEFAULT
    check_config(cache_write.DEFAULT, cache_write.SPACE, BLOCK_T=1)

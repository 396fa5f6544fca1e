"""flash_v1 and flash_v2 against the float64 reference, on drawn shapes and drawn configs (every config keep()
admits must be correct, not only DEFAULT)."""
import pytest
from hypothesis import given, strategies as st

from conftest import SHARDS
from strategies import configs, dense_problems
from tunebench.gate import check_dense_case
from tunebench.registry import kernel_module
from tunebench.shapes import suite

KERNELS = ("flash_v2", "flash_v1")


@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("kernel", KERNELS)
@given(data=st.data())
def test_matches_reference(kernel, shard, device, data):
    problem = data.draw(dense_problems(kernel), label="problem")
    config = data.draw(configs(kernel_module(kernel), problem), label="config")
    layout = data.draw(st.sampled_from(("bhnd", "bnhd")), label="layout")
    verdict = check_dense_case(problem, config, device, seed=data.draw(st.integers(0, 2**16)), layout=layout)
    assert verdict.ok, f"{problem} {config}: {verdict.reason}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_default_is_always_admitted(kernel):
    mod = kernel_module(kernel)
    for problem in suite("default") + suite("tiny"):
        if problem.kernel == kernel:
            assert mod.keep(mod.DEFAULT, problem) is None, problem

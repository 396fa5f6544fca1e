"""flash_v1 and flash_v2 against the float64 reference, on drawn shapes and drawn configs (every config keep()
admits must be correct, not only DEFAULT)."""
import pytest
import torch
from hypothesis import given, strategies as st

from strategies import configs, dense_inputs, dense_problems
from tunebench.correctness import close_enough, poison
from tunebench.registry import kernel_module
import tunebench.reference as ref

KERNELS = ("flash_v2", "flash_v1")


def check_dense(kernel, problem, config, device, seed=0, layout="bhnd"):
    mod = kernel_module(kernel)
    q, k, v = dense_inputs(problem, device, seed, layout)
    out = poison(torch.empty(problem.B, problem.Hq, problem.Nq, problem.D, dtype=q.dtype, device=device))
    mod.launch(q, k, v, config=config, causal=problem.causal, out=out)
    ref64 = ref.attention(q, k, v, problem.causal)
    lowp = ref.attention(q, k, v, problem.causal, dtype=q.dtype)
    verdict = close_enough(out, ref64, lowp)
    assert verdict.ok, f"{problem} {config}: {verdict.reason}"


@pytest.mark.parametrize("kernel", KERNELS)
@given(data=st.data())
def test_matches_reference(kernel, device, data):
    problem = data.draw(dense_problems(kernel), label="problem")
    config = data.draw(configs(kernel_module(kernel), problem), label="config")
    layout = data.draw(st.sampled_from(("bhnd", "bnhd")), label="layout")
    check_dense(kernel, problem, config, device, seed=data.draw(st.integers(0, 2**16)), layout=layout)


@pytest.mark.parametrize("kernel", KERNELS)
def test_default_is_always_admitted(kernel):
    from tunebench.shapes import suite
    mod = kernel_module(kernel)
    for problem in suite("default") + suite("tiny"):
        if problem.kernel == kernel:
            assert mod.keep(mod.DEFAULT, problem) is None, problem

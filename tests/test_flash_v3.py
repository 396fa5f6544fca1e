"""flash_v3 (Gluon, sm_90): on a CPU, its refusals and its compile for sm_90a (no GPU, no interpreter: Triton lowers
it and ptxas assembles it, which catches syntax, layout, type and shared-memory errors); on a Hopper GPU, its results
against the float64 reference on drawn shapes and drawn configs."""
import dataclasses
import itertools
import math

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import SHARDS
from sm90 import compile_cases
from strategies import configs, dense_problems
from tunebench import cli, commands
from tunebench.gate import check_dense_case
from tunebench.kernels import flash_v3
from tunebench.registry import known_kernels, require_kernels
from tunebench.shapes import Problem

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
SMEM_LIMIT = 227 * 1024


def _admitted(dtype: str, D: int) -> list[dict]:
    """Every config of SPACE that keep() admits on an sm_90 device (keep's device check aside)."""
    keys = list(flash_v3.SPACE)
    confs = [dict(zip(keys, values)) for values in itertools.product(*flash_v3.SPACE.values())]
    return [c for c in confs if flash_v3._unfit(c, dtype, D) is None]


def _case(config, B=1, Hq=4, Hkv=2, Nq=100, Nk=300, D=128, dtype="float16", causal=True) -> dict:
    return dict(config=config, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, dtype=dtype, causal=causal)


# -- CPU: refusals -------------------------------------------------------------------------------------------------

@pytest.mark.skipif(HOPPER, reason="checks the refusal off Hopper")
def test_refused_off_hopper_with_the_reason():
    q = torch.randn(1, 2, 64, 64).half()
    with pytest.raises(ValueError, match="Hopper"):
        flash_v3.launch(q, q, q)
    problem = Problem("flash_v3", 1, 2, 2, 128, 128, 128, "bfloat16")
    assert "Hopper" in flash_v3.keep(flash_v3.DEFAULT, problem)
    assert "flash_v3" not in known_kernels()
    with pytest.raises(KeyError, match="flash_v3.*not available here.*Hopper"):
        require_kernels(["flash_v3"])


@pytest.mark.skipif(HOPPER, reason="checks the refusal off Hopper")
def test_check_command_refuses_flash_v3_clearly(capsys):
    assert cli.main(["check", "--kernel", "flash_v3"]) == commands.USAGE
    err = capsys.readouterr().err
    assert "flash_v3" in err and "not available here" in err and "Hopper" in err


@pytest.mark.parametrize("case, make, exc, named", [
    ("fp32", lambda: (torch.randn(1, 2, 64, 64),) * 3, TypeError, "float16 or bfloat16"),
    ("head dim 96", lambda: (torch.randn(1, 2, 64, 96).half(),) * 3, ValueError, "head dim"),
    ("last dim strided", lambda: (torch.randn(1, 2, 128, 64).half().transpose(2, 3),) * 3, ValueError,
     "contiguous last dim"),
    ("unaligned rows", lambda: (torch.randn(1, 2, 64, 68).half()[..., :64],) * 3, ValueError, "16 bytes"),
])
def test_refuses_what_it_cannot_run(case, make, exc, named):
    with pytest.raises(exc, match=named):
        flash_v3.launch(*make())


def test_keep_bounds_shared_memory_registers_and_warps():
    assert "shared memory" in flash_v3._unfit(
        dict(flash_v3.DEFAULT, BLOCK_N=128, STAGES=3), "float16", 256)
    assert "register" in flash_v3._unfit(dict(flash_v3.DEFAULT, num_warps=4), "float16", 128)
    assert flash_v3._unfit(dict(flash_v3.DEFAULT, BLOCK_N=128, OVERLAP=True, WARP_SPECIALIZE=True),
                           "bfloat16", 128) is None               # ptxas: 168 registers, an 8-byte spill at most
    assert "16 rows per warp" in flash_v3._unfit(dict(flash_v3.DEFAULT, BLOCK_M=64, num_warps=8), "float16", 64)
    assert "float16 or bfloat16" in flash_v3._unfit(flash_v3.DEFAULT, "float32", 64)
    pingpong = dict(flash_v3.DEFAULT, BLOCK_M=64, BLOCK_N=128, num_warps=4, WARP_SPECIALIZE=True, PINGPONG=True)
    assert flash_v3._unfit(pingpong, "bfloat16", 128) is None
    assert "WARP_SPECIALIZE" in flash_v3._unfit(dict(pingpong, WARP_SPECIALIZE=False), "bfloat16", 128)
    assert "num_warps=4" in flash_v3._unfit(dict(pingpong, BLOCK_M=128, num_warps=8), "bfloat16", 128)
    # Two Q tiles: what fits one consumer with three stages does not fit two.
    assert flash_v3._unfit(dict(pingpong, BLOCK_N=64, PINGPONG=False, STAGES=3), "bfloat16", 256) is None
    assert "shared memory" in flash_v3._unfit(dict(pingpong, BLOCK_N=64, STAGES=3), "bfloat16", 256)
    for dtype, D in itertools.product(flash_v3.DTYPES, flash_v3.HEAD_DIMS):
        assert flash_v3._unfit(flash_v3.DEFAULT, dtype, D) is None, (dtype, D)


def test_bad_configs_are_refused():
    q = torch.randn(1, 2, 64, 64).half()
    with pytest.raises(ValueError, match="STAGES"):
        flash_v3.launch(q, q, q, dict(flash_v3.DEFAULT, STAGES=5))
    with pytest.raises(ValueError, match="WARP_SPECIALIZE"):
        flash_v3.launch(q, q, q, dict(flash_v3.DEFAULT, WARP_SPECIALIZE=1))
    with pytest.raises(ValueError, match="OVERLAP"):
        flash_v3.launch(q, q, q, dict(flash_v3.DEFAULT, OVERLAP=None))
    with pytest.raises(ValueError, match="PINGPONG"):
        flash_v3.launch(q, q, q, dict(flash_v3.DEFAULT, PINGPONG=2))


# -- CPU: compile for sm_90a ---------------------------------------------------------------------------------------

PINGPONG_CONFIG = dict(flash_v3.DEFAULT, BLOCK_M=64, BLOCK_N=128, num_warps=4, WARP_SPECIALIZE=True, PINGPONG=True)

FAST_CASES = [   # each structure once, on awkward shapes (tails, GQA, Nq != Nk)
    _case(flash_v3.DEFAULT, D=128, dtype="float16", causal=True),
    _case(dict(flash_v3.DEFAULT, WARP_SPECIALIZE=True, OVERLAP=True), D=128, dtype="bfloat16", causal=True,
          Nq=300, Nk=100),
    _case(dict(flash_v3.DEFAULT, BLOCK_M=64, num_warps=4, STAGES=3, OVERLAP=True), D=64, dtype="bfloat16",
          causal=False, Hkv=1),
    _case(dict(flash_v3.DEFAULT, WARP_SPECIALIZE=True), D=256, dtype="float16", causal=False),
    # OVERLAP on the first case the H100 gate found wrong (causal, one key block per stage, 8 warps)
    _case(dict(flash_v3.DEFAULT, BLOCK_M=128, BLOCK_N=128, num_warps=8, STAGES=3, OVERLAP=True), D=64,
          dtype="float16", causal=True, Nq=1, Nk=128, Hq=1, Hkv=1, B=1),
    # two consumer warpgroups taking turns, with and without the intra-warpgroup overlap
    _case(dict(PINGPONG_CONFIG, OVERLAP=True), D=128, dtype="bfloat16", causal=True, Nq=300, Nk=1000),
    _case(dict(PINGPONG_CONFIG, BLOCK_N=64), D=256, dtype="float16", causal=False),
]


def _assert_compiled(cases: list[dict]) -> None:
    for case, result in zip(cases, compile_cases(cases)):
        assert result["ok"], f"{case}: {result['error']}"
        assert result["ptx_target"] and result["shared"] <= SMEM_LIMIT, (case, result)
        assert result["warp_specialized"] == case["config"]["WARP_SPECIALIZE"], (case, result)
        # The schedule compiles as written: ptxas neither serializes the wgmmas nor injects a wait of its own.
        assert not result["wgmma_notes"], (case, result["wgmma_notes"])


def test_compiles_for_sm90():
    """Each structure once, compiled to an sm_90a cubin in one child process (about 20 s on a CPU)."""
    _assert_compiled(FAST_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("D", flash_v3.HEAD_DIMS)
def test_every_admitted_config_compiles_for_sm90(D):
    """Every config keep() admits on Hopper: about 85 compiles of a few seconds each, so outside the CPU gate."""
    _assert_compiled([_case(c, D=D, causal=causal, dtype=dtype)
                      for c in _admitted("float16", D) for causal, dtype in ((True, "float16"), (False, "bfloat16"))])


# -- GPU -------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("shard", range(SHARDS))
@given(data=st.data())
def test_matches_reference(shard, device, data):
    problem = data.draw(dense_problems("flash_v3", head_dims=(64, 128), dtypes=flash_v3.DTYPES), label="problem")
    config = data.draw(configs(flash_v3, problem), label="config")
    layout = data.draw(st.sampled_from(("bhnd", "bnhd")), label="layout")
    verdict = check_dense_case(problem, config, device, seed=data.draw(st.integers(0, 2**16)), layout=layout)
    assert verdict.ok, f"{problem} {config}: {verdict.reason}"


AWKWARD = [   # odd N, Nq != Nk causal (rows that see no key), GQA 8, head dim 256
    Problem("flash_v3", 2, 16, 2, 1025, 97, 128, "bfloat16", causal=True),
    Problem("flash_v3", 1, 8, 1, 97, 1025, 64, "float16", causal=True),
    Problem("flash_v3", 1, 4, 4, 4095, 4095, 256, "bfloat16", causal=False),
    Problem("flash_v3", 3, 8, 8, 1, 513, 128, "float16", causal=False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("problem", AWKWARD, ids=lambda p: p.label())
@pytest.mark.parametrize("structure", [{}, {"WARP_SPECIALIZE": True}, {"OVERLAP": True},
                                       {"BLOCK_M": 64, "num_warps": 4, "OVERLAP": True, "WARP_SPECIALIZE": True},
                                       {"BLOCK_M": 64, "num_warps": 4, "WARP_SPECIALIZE": True, "PINGPONG": True},
                                       {"BLOCK_M": 64, "num_warps": 4, "WARP_SPECIALIZE": True, "PINGPONG": True,
                                        "OVERLAP": True}])
def test_awkward_shapes(problem, structure, device):
    config = dict(flash_v3.DEFAULT, **structure)
    assert flash_v3.keep(config, problem) is None
    for layout in ("bhnd", "bnhd"):
        verdict = check_dense_case(problem, config, device, seed=3, layout=layout)
        assert verdict.ok, f"{problem} {config} {layout}: {verdict.reason}"


# The cases on which the first OVERLAP schedule gave wrong results (H100, 2026-12-06: max error 0.37 and 0.55 against
# 4e-4 allowed; it carried in-flight wgmma values around its loop). The rebuilt schedule passed them on an H100 that
# evening; kept as a regression check.
OVERLAP_CAUSAL = [
    (Problem("flash_v3", 1, 1, 1, 1, 97, 64, "float16", causal=True),
     dict(flash_v3.DEFAULT, BLOCK_M=64, BLOCK_N=64, num_warps=4, STAGES=3, OVERLAP=True)),
    (Problem("flash_v3", 1, 1, 1, 1, 128, 64, "float16", causal=True),
     dict(flash_v3.DEFAULT, BLOCK_M=128, BLOCK_N=128, num_warps=8, STAGES=3, OVERLAP=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("problem, config", OVERLAP_CAUSAL, ids=lambda x: getattr(x, "label", lambda: None)())
def test_overlap_on_causal_problems(problem, config, device):
    assert flash_v3.keep(config, problem) is None
    verdict = check_dense_case(problem, config, device, seed=0)
    assert verdict.ok, verdict.reason


@pytest.mark.gpu
def test_large_magnitudes_do_not_overflow(device):
    """Scores near 1e4 (scale 1): the running max keeps exp2 finite."""
    g = torch.Generator(device=device).manual_seed(5)
    q, k, v = (torch.randn(1, 2, 300, 128, generator=g, device=device) * 10 for _ in range(3))
    q, k, v = (t.bfloat16() for t in (q, k, v))
    out = flash_v3.launch(q, k, v, causal=True, scale=1.0, out=torch.full_like(q, math.nan))
    from tunebench.correctness import close_enough
    import tunebench.reference as ref
    verdict = close_enough(out, ref.attention(q, k, v, True, scale=1.0),
                           ref.attention(q, k, v, True, scale=1.0, dtype=q.dtype))
    assert verdict.ok, verdict.reason

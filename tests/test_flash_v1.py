"""flash_v1 specifics the generic dense test (test_dense_kernels.py) does not cover: launch's input validation, the
[B, N, H, D].transpose(1, 2) layout with a strided out, an explicit scale with large scores, exact zeros for rows that
see no key, and keep()'s verdicts on the largest shapes the GPU profile draws."""
import pytest
import torch

import tunebench.reference as ref
from tunebench.correctness import close_enough, poison
from tunebench.registry import kernel_module
from tunebench.shapes import Problem
from tunebench.strategies import all_configs
from tunebench.inputs import Workload

from conftest import DEVICE

fv1 = kernel_module("flash_v1")
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def qkv(B=1, Hq=2, Hkv=1, Nq=24, Nk=24, D=16, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, D, generator=g).to(dtype=dtype, device=device)
                 for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))


def assert_close(out, q, k, v, causal, scale=None):
    ref64 = ref.attention(q, k, v, causal, scale=scale)
    verdict = close_enough(out, ref64, ref.attention(q, k, v, causal, scale=scale, dtype=q.dtype))
    assert verdict.ok, verdict.reason


def _bad_inputs():
    q, k, v = qkv()
    cases = {
        "q not a tensor": (dict(q=q.cpu().numpy()), TypeError, "q must be a torch.Tensor"),
        "q 3-d": (dict(q=q[0]), ValueError, "q must be 4-d"),
        "k 5-d": (dict(k=k[None]), ValueError, "k must be 4-d"),
        "integer q": (dict(q=q.to(torch.int32)), TypeError, "q dtype"),
        "k dtype differs": (dict(k=k.half()), TypeError, "k dtype"),
        "v on another device": (dict(v=v.to("meta")), ValueError, "v is on meta"),
        "k, v shapes differ": (dict(v=v[:, :, :5]), ValueError, "k shape .* must equal v shape"),
        "batch differs": (dict(k=k.expand(2, -1, -1, -1), v=v.expand(2, -1, -1, -1)), ValueError, "batch size"),
        "head dims differ": (dict(k=k[..., :8], v=v[..., :8]), ValueError, "head dim"),
        "Hq not a multiple of Hkv": (dict(q=torch.cat([q, q[:, :1]], 1), k=torch.cat([k, k], 1), v=torch.cat([v, v], 1)),
                                     ValueError, "multiple of k/v heads"),
        "head dim too small": (dict(q=q[..., :8], k=k[..., :8], v=v[..., :8]), ValueError, "head dim D"),
        "head dim too large": (dict(q=torch.randn(1, 1, 2, 264, device=DEVICE), k=torch.randn(1, 1, 2, 264, device=DEVICE),
                                    v=torch.randn(1, 1, 2, 264, device=DEVICE)), ValueError, "head dim D"),
        "out shape": (dict(out=torch.empty(1, 2, 24, 8, device=DEVICE)), ValueError, "out shape"),
        "out dtype": (dict(out=torch.empty(1, 2, 24, 16, dtype=torch.float16, device=DEVICE)), TypeError, "out dtype"),
        "unknown config key": (dict(config={**SMALL, "BLOCK_K": 16}), ValueError, "unknown keys"),
        "missing config key": (dict(config={"BLOCK_M": 16}), ValueError, "missing keys"),
        "BLOCK_M below 16": (dict(config={**SMALL, "BLOCK_M": 8}), ValueError, "BLOCK_M"),
        "BLOCK_N not a power of two": (dict(config={**SMALL, "BLOCK_N": 48}), ValueError, "BLOCK_N"),
        "num_warps": (dict(config={**SMALL, "num_warps": 3}), ValueError, "num_warps"),
        "num_stages": (dict(config={**SMALL, "num_stages": 0}), ValueError, "num_stages"),
        "scale not a number": (dict(scale="0.1"), TypeError, "scale"),
        # v1 shares v2's input check: before it, v1 ran a NaN scale and read causal="no" as True.
        "scale NaN": (dict(scale=float("nan")), ValueError, "scale must be finite"),
        "causal not a bool": (dict(causal="no"), TypeError, "causal must be a bool"),
    }
    return {name: (dict(dict(q=q, k=k, v=v), **change), exc, match) for name, (change, exc, match) in cases.items()}


BAD = _bad_inputs()


@pytest.mark.parametrize("case", BAD)
def test_launch_rejects_bad_input(case):
    kwargs, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        fv1.launch(**kwargs)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the kernel may have been compiled, not interpreted")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="q is on cpu.*TRITON_INTERPRET"):
        fv1.launch(*qkv())


def test_bnhd_inputs_and_strided_out(device):
    # q, k, v stored [B, N, H, D] and viewed [B, H, N, D] (no copy); out too. Several K/V and Q blocks, tails masked.
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 37, 45, 48
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, n, h, D, generator=g).half().to(device).transpose(1, 2)
               for n, h in ((Nq, Hq), (Nk, Hkv), (Nk, Hkv)))
    out = poison(torch.empty(B, Nq, Hq, D, dtype=q.dtype, device=device)).transpose(1, 2)
    assert not q.is_contiguous() and not out.is_contiguous()
    for causal in (False, True):
        assert fv1.launch(q, k, v, SMALL, causal=causal, out=out) is out
        assert_close(out, q, k, v, causal)


def test_explicit_scale_with_large_scores(device):
    # Scores up to ~+-50: the running max moves between K/V blocks, so the rescaling of O, l in HBM must be right.
    q, k, v = (t.to(device) for t in qkv(Nq=20, Nk=64, D=32))
    out = fv1.launch(q, k, v, SMALL, causal=True, scale=2.0)
    assert_close(out, q, k, v, True, scale=2.0)


def test_rows_that_see_no_key_are_zero(device):
    # Causal with Nq > Nk, bottom-right aligned: the first Nq - Nk query rows see no key.
    q, k, v = (t.to(device) for t in qkv(Nq=40, Nk=9, D=16, dtype=torch.float16))
    out = fv1.launch(q, k, v, causal=True)      # config None -> DEFAULT; out None -> allocated
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(out[:, :, :31].float().cpu(), torch.zeros(1, 2, 31, 16))
    assert_close(out, q, k, v, True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("D", [16, 111, 256])
def test_default_admitted_on_the_largest_problems(dtype, D):
    for causal in (False, True):
        problem = Problem("flash_v1", 4, 32, 8, 16384, 16384, D, dtype, causal)
        assert fv1.keep(fv1.DEFAULT, problem) is None


def test_keep_rejects_what_cannot_run():
    fp32_256 = Problem("flash_v1", 1, 8, 8, 4096, 4096, 256, "float32")
    over_smem = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    assert "shared memory" in fv1.keep(over_smem, fp32_256)
    fp16_256 = Problem("flash_v1", 1, 8, 8, 4096, 4096, 256, "float16")
    assert "register" in fv1.keep({"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}, fp16_256)
    assert "head dim" in fv1.keep(fv1.DEFAULT, Problem("flash_v1", 1, 1, 1, 64, 64, 512))
    assert "keys" in fv1.keep({"BLOCK_M": 16}, fp32_256)


def edge_configs(problem, n=3):
    """The admitted configs with the most estimated shared memory and the most register pressure."""
    D_pad, elem = fv1.padded_head_dim(problem.D), 4 if problem.dtype == "float32" else 2
    admitted = all_configs(fv1, problem)
    by_smem = sorted(admitted, key=lambda c: fv1.shared_memory_bytes(c, D_pad, elem))[-n:]
    by_regs = sorted(admitted, key=lambda c: fv1.registers_per_thread(c, D_pad, elem))[-n:]
    return [c for i, c in enumerate(by_smem + by_regs) if c not in (by_smem + by_regs)[:i]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, D", [("float32", 256), ("bfloat16", 256), ("float16", 111), ("float32", 16),
                                      ("float16", 16)])
def test_edge_configs_fit_and_are_correct(dtype, D):
    # keep() is all that stands between SPACE and the compiler, and random draws rarely hit its edges: the admitted
    # configs nearest its limits must compile, use no more shared memory than estimated, and be correct.
    problem = Problem("flash_v1", 2, 4, 2, 97, 130, D, dtype, causal=True)
    work = Workload(problem, seed=0, device="cuda")
    D_pad, elem = fv1.padded_head_dim(D), 4 if dtype == "float32" else 2
    for config in edge_configs(problem):
        grid, args, meta = fv1.kernel_arguments(work.q, work.k, work.v, work.out, config, True, None)
        compiled = fv1._flash_v1_fwd.warmup(*args, grid=grid, **meta)
        assert compiled.metadata.shared <= fv1.shared_memory_bytes(config, D_pad, elem) + fv1.SHARED_MEMORY_SLACK
        verdict = work.check(fv1, config)
        assert verdict.ok, f"{config}: {verdict.reason}"

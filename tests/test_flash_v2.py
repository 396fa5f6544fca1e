"""flash_v2 beyond the generic dense test: input validation, strides without copies, rows that see no key, scale,
config validation and keep()."""
import math

import pytest
import torch

from tunebench.correctness import close_enough, poison
from tunebench.kernels import flash_v2
from tunebench.kernels._launch import interpreting
from tunebench.shapes import Problem
import tunebench.reference as ref

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "USE_TMA": False}


def _qkv(B=1, Hq=2, Hkv=1, Nq=16, Nk=16, D=16, dtype=torch.float16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, n: torch.randn(B, h, n, D, generator=g).to(dtype=dtype, device=device)  # noqa: E731
    return mk(Hq, Nq), mk(Hkv, Nk), mk(Hkv, Nk)


def _bad_inputs(device):
    q, k, v = _qkv(device=device)
    return {
        "q not 4-d": ((q[0], k, v), {}, ValueError, "q"),
        "k not a tensor": ((q, k.tolist(), v), {}, TypeError, "k"),
        "integer v": ((q, k, v.to(torch.int32)), {}, TypeError, "v"),
        "float64 q": ((q.double(), k, v), {}, TypeError, "q"),
        "k dtype differs": ((q, k.float(), v), {}, TypeError, "k"),
        "head dims differ": ((q, k[..., :8], v[..., :8]), {}, ValueError, "head dim"),
        "k/v shapes differ": ((q, k, v[:, :, :8]), {}, ValueError, "v shape"),
        "Hq not a multiple of Hkv": ((q, *_qkv(Hq=3, Hkv=3, device=device)[1:]), {}, ValueError, "Hkv"),
        "head dim too large": (_qkv(D=288, device=device), {}, ValueError, "head dim"),
        "head dim too small": (_qkv(D=8, device=device), {}, ValueError, "head dim"),
        "out shape": ((q, k, v), {"out": q[:, :1]}, ValueError, "out"),
        "out dtype": ((q, k, v), {"out": q.float()}, TypeError, "out"),
        "causal not bool": ((q, k, v), {"causal": 1}, TypeError, "causal"),
        "scale not finite": ((q, k, v), {"scale": math.inf}, ValueError, "scale"),
        "unknown config key": ((q, k, v), {"config": dict(SMALL, BLOCK_K=32)}, ValueError, "BLOCK_K"),
        "missing config key": ((q, k, v), {"config": {"BLOCK_M": 16}}, ValueError, "missing"),
        "BLOCK_N not a power of two": ((q, k, v), {"config": dict(SMALL, BLOCK_N=48)}, ValueError, "BLOCK_N"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs("cpu")))
def test_launch_rejects_bad_inputs(case, device):
    args, kwargs, exc, named = _bad_inputs(device)[case]
    kwargs.setdefault("config", SMALL)
    with pytest.raises(exc, match=named):
        flash_v2.launch(*args, **kwargs)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CPU tensors"):
        flash_v2.launch(*_qkv(), SMALL)


def test_bnhd_strides_work_without_a_copy(device, monkeypatch):
    """[B, N, H, D] storage seen as [B, H, N, D]: nothing may be made contiguous, and out keeps the caller's strides."""
    B, N, H, D = 2, 33, 4, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, N, H, D, generator=g).half().to(device).transpose(1, 2) for _ in range(3))
    k, v = k[:, :2], v[:, :2]                                         # GQA: 4 query heads on 2 kv heads
    out_storage = torch.empty(B, N, H, D, dtype=q.dtype, device=device)
    out = poison(out_storage.transpose(1, 2))

    def no_copy(*a, **kw):
        raise AssertionError("launch made a contiguous copy")
    monkeypatch.setattr(torch.Tensor, "contiguous", no_copy)
    res = flash_v2.launch(q, k, v, SMALL, causal=True, out=out)
    monkeypatch.undo()
    assert res.data_ptr() == out_storage.data_ptr() and res.stride() == out.stride()
    verdict = close_enough(out, ref.attention(q, k, v, True), ref.attention(q, k, v, True, dtype=q.dtype))
    assert verdict.ok, verdict.reason


def test_causal_rows_without_keys_are_zero(device):
    # Bottom-right alignment with Nq > Nk: query i sees key j iff j <= i - (Nq - Nk), so the first 24 rows see none.
    q, k, v = _qkv(Nq=40, Nk=16, D=32, dtype=torch.float32, device=device)
    out = flash_v2.launch(q, k, v, dict(SMALL, BLOCK_M=32), causal=True, out=poison(torch.empty_like(q)))
    assert torch.all(out[:, :, :24] == 0)
    verdict = close_enough(out, ref.attention(q, k, v, True), ref.attention(q, k, v, True, dtype=q.dtype))
    assert verdict.ok, verdict.reason


def test_scale_is_used(device):
    q, k, v = _qkv(Nq=20, Nk=37, D=48, dtype=torch.float32, device=device)
    out = flash_v2.launch(q, k, v, None, scale=0.5)
    verdict = close_enough(out, ref.attention(q, k, v, scale=0.5), ref.attention(q, k, v, scale=0.5, dtype=q.dtype))
    assert verdict.ok, verdict.reason


def test_keep_admits_tma_only_on_hopper_outside_the_interpreter(monkeypatch):
    """On Hopper (an H200: capability 9.0) keep admits TMA for 16-bit wgmma-sized tiles and nothing else; off Hopper,
    and in the interpreter anywhere, it rejects TMA."""
    problem = Problem("flash_v2", 1, 2, 2, 128, 128, 64, "float16")
    tma = dict(flash_v2.DEFAULT, USE_TMA=True)
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
    if hopper and not interpreting():
        assert flash_v2.keep(tma, problem) is None
        assert flash_v2.keep(dict(tma, USE_TMA=False), problem) is None
        assert "fp32" in flash_v2.keep(tma, Problem("flash_v2", 1, 2, 2, 128, 128, 64, "float32"))
        assert "BLOCK_M < 64" in flash_v2.keep(dict(tma, BLOCK_M=32), problem)
    else:
        assert "compute capability >= 9" in flash_v2.keep(tma, problem)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "not the interpreter" in flash_v2.keep(tma, problem)
    assert flash_v2.keep(dict(tma, USE_TMA=False), problem) is None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_keep_bounds_shared_memory_and_admits_default(dtype):
    """The biggest 16-bit tiles do not fit the H100's 227 KiB and are rejected; fp32 runs every config on a tile
    small enough for registers (FMA dots), and DEFAULT is admitted for every head dim."""
    problem = Problem("flash_v2", 1, 1, 1, 4096, 4096, 256, dtype, causal=True)
    huge = {"BLOCK_M": 256, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4, "USE_TMA": False}
    if dtype == "float32":
        assert flash_v2.keep(huge, problem) is None
        assert flash_v2._tiles(huge, True, 256) == (16, 16)
    else:
        assert "shared memory" in flash_v2.keep(huge, problem)
    for D in (16, 40, 64, 111, 128, 160, 256):
        p = Problem("flash_v2", 1, 1, 1, 64, 64, D, dtype)
        assert flash_v2.keep(flash_v2.DEFAULT, p) is None, p

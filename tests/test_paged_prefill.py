"""The paged prefill kernel (varlen queries over a paged cache) against the float64 reference: gather each sequence's
K/V through its block table, then the dense reference with the bottom-right causal mask.

Hypothesis draws the problem (GQA 1/2/4/8, page sizes 8-128, dtypes), the config from SPACE as keep() admits it and
a ragged batch: the first sequence has Nq new tokens over Nk - Nq cached ones, the others are idle rows, decode rows,
whole prompts or chunks over a cached prefix. Blocks are a random permutation of the pool, rows past every context
hold NaN, outputs are NaN-poisoned, and half the layouts are strided views (the integer tensors too).
"""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import SHARDS
from strategies import all_configs, configs
import tunebench
from tunebench.correctness import close_enough, poison
from tunebench.paged_inputs import paged_inputs, paged_prefill_inputs, paged_prefill_references
from tunebench.runtime.dispatch import _paged_prefill_problem
from tunebench.shapes import PAGES, Problem, bucket_key, suite
from tunebench.strategies import paged_prefill_layouts, paged_prefill_problems, paged_problems
from tunebench.kernels import paged_attention as pa, paged_prefill as pp


def check_prefill(problem, config, device, seed=0, scale=None, **layout):
    args = paged_prefill_inputs(problem, device, seed, **layout)
    assert args[1].shape[1] == problem.page
    out = poison(torch.empty_like(args[0]))
    assert pp.launch(*args, config=config, scale=scale, out=out) is out
    verdict = close_enough(out, *paged_prefill_references(*args, scale=scale))
    assert verdict.ok, f"{problem.label()} {config} {layout}: {verdict.reason}"


@given(data=st.data())
def test_matches_reference(device, data):
    problem = data.draw(paged_prefill_problems(), label="problem")
    config = data.draw(configs(pp, problem), label="config")
    layout = data.draw(paged_prefill_layouts(problem), label="layout")
    check_prefill(problem, config, device, seed=data.draw(st.integers(0, 2**16), label="seed"), **layout)


def _cfg(**kw):
    return dict(pp.DEFAULT, **kw)


# Pinned cases: each names what it covers, whatever Hypothesis happens to draw.
PINNED = [
    ("mixed decode rows, idle row and chunks over a cache", Problem("paged_prefill", 4, 8, 2, 20, 70, 32, causal=True, page=8),
     _cfg(BLOCK_M=16, BLOCK_N=16), dict(context_lens=[70, 33, 5, 64], q_lens=[20, 1, 0, 64], strided=True)),
    ("tile spans pages, group 8 fills BLOCK_M", Problem("paged_prefill", 2, 8, 1, 9, 40, 16, "float32", True, 8),
     _cfg(BLOCK_M=16, BLOCK_N=64), dict(context_lens=[40, 17], q_lens=[9, 17])),
    ("group above BLOCK_M split over programs", Problem("paged_prefill", 1, 24, 1, 3, 30, 16, causal=True, page=128),
     _cfg(BLOCK_M=16, BLOCK_N=32), {}),
    ("non-power-of-two head dim, shared prefix", Problem("paged_prefill", 3, 4, 4, 5, 50, 48, causal=True, page=16),
     _cfg(BLOCK_M=32, BLOCK_N=16), dict(context_lens=[50, 48, 40], q_lens=[5, 8, 1], shared_blocks=2)),
    # Group 4 with BLOCK_M 64: sequences of at most 4 new tokens run a 16-row tile (pp._small_rows), 5 and more the
    # 64-row one; the edge on both sides, a decode row and a chunk in one batch.
    ("few new tokens in the small tile, at its edge", Problem("paged_prefill", 5, 8, 2, 40, 90, 64, causal=True,
                                                                page=16),
     _cfg(BLOCK_M=64, BLOCK_N=32), dict(context_lens=[90, 12, 4, 30, 77], q_lens=[40, 4, 1, 5, 3], strided=True)),
]


def test_the_small_tile_is_used_only_where_it_is_smaller():
    assert pp._small_rows(4, 64) == 16 and pp._small_rows(4, 16) == 0 and pp._small_rows(1, 32) == 16
    assert pp._small_rows(24, 64) == 32 and pp._small_rows(24, 32) == 0 and pp._small_rows(64, 128) == 64


@pytest.mark.parametrize("what, problem, config, layout", PINNED, ids=[p[0] for p in PINNED])
def test_pinned(device, what, problem, config, layout):
    assert pp.keep(config, problem) is None
    check_prefill(problem, config, device, seed=7, **layout)


@given(data=st.data())
def test_one_new_token_is_decode(device, data):
    """Every sequence with one new token: the same result as the decode kernel on the same inputs."""
    problem = data.draw(paged_problems(contexts=(1, 16, 33, 100)), label="problem")
    q, kc, vc, bt, cl = args = paged_inputs(problem, device, seed=3, **data.draw(st.fixed_dictionaries(
        {"extra_columns": st.integers(0, 2), "strided": st.booleans()}), label="layout"))
    cu = torch.arange(problem.B + 1, dtype=torch.int32, device=device)
    decode = pa.launch(*args, config=data.draw(configs(pa, problem), label="decode config"))
    prefill_problem = dataclasses.replace(problem, kernel="paged_prefill", causal=True)
    prefill = pp.launch(q, kc, vc, bt, cu, cl, config=data.draw(configs(pp, prefill_problem), label="config"))
    verdict = close_enough(prefill, *paged_prefill_references(q, kc, vc, bt, cu, cl))
    assert verdict.ok, verdict.reason
    assert (prefill.double() - decode.double()).abs().max().item() <= verdict.allowed


def test_public_api_dispatches_and_buckets(device):
    problem = Problem("paged_prefill", 3, 8, 2, 9, 40, 32, causal=True, page=16)
    args = paged_prefill_inputs(problem, device, seed=5, q_lens=[9, 1, 4], context_lens=[40, 30, 4],
                                extra_columns=0)
    out = tunebench.paged_prefill(*args, scale=0.3)
    assert close_enough(out, *paged_prefill_references(*args, scale=0.3)).ok
    assert torch.equal(out, pp.launch(*args, config=tunebench.tuned_config(_paged_prefill_problem(*args[:2],
                                                                                                  *args[3:5])),
                                      scale=0.3))
    chosen = _paged_prefill_problem(args[0], args[1], args[3], args[4])
    assert (chosen.B, chosen.Nq, chosen.Nk, chosen.page, chosen.causal) == (3, 5, 48, 16, True)
    assert bucket_key(chosen).endswith("Nq8|Nk64|page16") and "causal" in bucket_key(chosen)


def test_stored_winner_is_dispatched_per_page(tmp_path, monkeypatch, device):
    from tunebench.device import DeviceIdentity
    from tunebench.registry import kernel_identity
    from tunebench.runtime import dispatch, winners
    from tunebench.store import Store
    monkeypatch.setenv("TUNEBENCH_DB", f"sqlite:///{tmp_path / 'user.db'}")
    monkeypatch.setattr(winners, "packaged_db_path", lambda: None)
    args = paged_prefill_inputs(Problem("paged_prefill", 2, 8, 2, 6, 20, 32, causal=True, page=8), device, seed=2,
                                q_lens=[6, 1], context_lens=[20, 9], extra_columns=0)
    tuned = _cfg(BLOCK_M=16, BLOCK_N=64, num_stages=1)
    problem = _paged_prefill_problem(args[0], args[1], args[3], args[4])
    Store(f"sqlite:///{tmp_path / 'user.db'}").upsert_winner(
        DeviceIdentity.current(interpret=not torch.cuda.is_available()), "paged_prefill",
        kernel_identity("paged_prefill"), problem, tuned, 1.0, 1.3)
    dispatch.reload()
    try:
        assert "exact winner" in tunebench.explain(problem) and "page8" in tunebench.explain(problem)
        assert tunebench.tuned_config(problem) == tuned
        assert close_enough(tunebench.paged_prefill(*args), *paged_prefill_references(*args)).ok
        other_page = dataclasses.replace(problem, page=16)          # a winner says nothing about another page
        assert tunebench.tuned_config(other_page) == pp.DEFAULT and "DEFAULT" in tunebench.explain(other_page)
    finally:
        dispatch.reload()


def test_gate_runs_the_kernel(device):
    from tunebench.gate import check_case, run_kernel_gate
    problem = Problem("paged_prefill", 3, 4, 1, 7, 33, 16, "float32", True, 16)
    assert check_case(problem, pp.DEFAULT, device, seed=4, layout="bnhd").ok
    stats = run_kernel_gate("paged_prefill", device, examples=3)
    assert stats.examples == 3 and not stats.failures


def test_problem_rules():
    with pytest.raises(ValueError, match="Nq .* <= Nk"):
        Problem("paged_prefill", 1, 8, 2, 65, 64, 32, causal=True)
    with pytest.raises(ValueError, match="causal == True"):
        Problem("paged_prefill", 1, 8, 2, 4, 64, 32)
    p = Problem("paged_prefill", 1, 8, 2, 4, 64, 32, causal=True)
    assert p.page == 16 and not p.paged and p.has_pages and "page16" in p.label()
    assert p.flops == 4.0 * 8 * 32 * (4 * 60 + 4 * 5 / 2)
    with pytest.raises(ValueError, match="page"):
        Problem("paged_prefill", 1, 8, 2, 4, 64, 32, causal=True, page=256)


def test_default_admitted_and_keep_rejects_what_cannot_fit():
    drawn = [Problem("paged_prefill", 1, g * h, h, 1, n, d, dt, True, page)
             for g in (1, 8, 128) for h in (1, 8) for n in (1, 32768) for d in (16, 80, 256)
             for dt in ("float16", "bfloat16", "float32") for page in PAGES]
    for problem in drawn + [p for p in suite("tiny") if p.kernel == "paged_prefill"]:
        assert pp.keep(pp.DEFAULT, problem) is None, problem
    big = Problem("paged_prefill", 1, 8, 1, 64, 4096, 256, "float32", True)
    assert "shared memory" in pp.keep(_cfg(BLOCK_N=128, num_stages=4), big)
    assert "register" in pp.keep(_cfg(BLOCK_M=128, num_warps=2, num_stages=1), dataclasses.replace(big, dtype="float16"))
    assert len(all_configs(pp, Problem("paged_prefill", 8, 32, 8, 512, 4096, 128, "bfloat16", True))) > 50


def _inputs(device, **over):
    problem = Problem("paged_prefill", 2, 8, 2, 6, 20, 32, causal=True, page=8)
    q, kc, vc, bt, cu, cl = paged_prefill_inputs(problem, device, seed=0, q_lens=[6, 2], context_lens=[20, 9],
                                                 strided=False)
    args = dict(q=q, k_cache=kc, v_cache=vc, block_tables=bt, cu_seqlens_q=cu, context_lens=cl)
    args.update(over)
    return args


def _i32(a, *values):
    return torch.tensor(values, dtype=torch.int32, device=a["q"].device)


BAD = [
    (lambda a: dict(q=a["q"][0]), ValueError, "q must be 3-d"),
    (lambda a: dict(q=a["q"].to(torch.int32)), TypeError, "q dtype must be float16"),
    (lambda a: dict(k_cache=a["k_cache"].float()), TypeError, "k_cache dtype .* must match q"),
    (lambda a: dict(v_cache=a["v_cache"].to("meta")), ValueError, "v_cache is on meta but q is on"),
    (lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError, "cu_seqlens_q must be int32"),
    (lambda a: dict(context_lens=a["context_lens"].long()), TypeError, "context_lens must be int32"),
    (lambda a: dict(block_tables=a["block_tables"].long()), TypeError, "block_tables must be int32"),
    (lambda a: dict(v_cache=a["v_cache"][:, :4]), ValueError, "must equal v_cache shape"),
    (lambda a: dict(q=a["q"][:, :7]), ValueError, "multiple of cache heads"),
    (lambda a: dict(q=a["q"][..., :16]), ValueError, "head dim"),
    (lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"][:2]), ValueError, "B \\+ 1 entries"),
    (lambda a: dict(block_tables=a["block_tables"][:1]), ValueError, "B rows"),
    (lambda a: dict(k_cache=a["k_cache"][:, :6], v_cache=a["v_cache"][:, :6]), ValueError, "power of two, got 6"),
    (lambda a: dict(cu_seqlens_q=_i32(a, 1, 7, 8)), ValueError, "must start at 0, got 1"),
    (lambda a: dict(cu_seqlens_q=_i32(a, 0, 7, 6)), ValueError, "nondecreasing"),
    (lambda a: dict(cu_seqlens_q=_i32(a, 0, 6, 7)), ValueError, "must end at q's 8 tokens"),
    (lambda a: dict(context_lens=_i32(a, 20, 1)), ValueError, r"context_lens\[1\]=1 must be >= the sequence's 2 new"),
    (lambda a: dict(context_lens=_i32(a, 25, 9)), ValueError, r"context_lens\[0\]=25 .* <= 24, the tokens block_tables"),
    (lambda a: dict(out=torch.empty(8, 8, 16, dtype=a["q"].dtype)), ValueError, "out shape"),
    (lambda a: dict(scale=math.inf), ValueError, "scale"),
    (lambda a: dict(config={"BLOCK_M": 16}), ValueError, "missing keys"),
    (lambda a: dict(config=_cfg(BLOCK_M=24)), ValueError, "BLOCK_M"),
]


@pytest.mark.parametrize("mutate, error, match", BAD, ids=[b[2] for b in BAD])
def test_rejects_bad_inputs(device, mutate, error, match):
    args = _inputs(device)
    args.update(mutate(args))
    with pytest.raises(error, match=match):
        pp.launch(**args)


@pytest.mark.parametrize("mutate, error, match", [b for b in BAD if "config" not in b[2] and "out" not in b[2]][:4]
                         + [(lambda a: dict(k_cache=a["k_cache"][:, :4], v_cache=a["v_cache"][:, :4]), ValueError,
                             r"block size \(shape\[1\]\) must be one of shapes.PAGES"),
                            (lambda a: dict(context_lens=_i32(a, 20, 1)), ValueError, "new tokens")])
def test_public_api_rejects_bad_inputs(device, mutate, error, match):
    args = _inputs(device)
    args.update(mutate(args))
    with pytest.raises(error, match=match):
        tunebench.paged_prefill(**args)


# -- the GPU gate: 200 examples in all, bottom-right causal over a cached context, GQA 8, page sizes 8-128 ----------

@pytest.mark.gpu
@pytest.mark.parametrize("shard", range(SHARDS))
@given(data=st.data())
def test_gpu_gate_cached_context_gqa8(shard, data):
    problem = data.draw(paged_prefill_problems(groups=(8,)).filter(lambda p: p.Nq < p.Nk), label="problem")
    config = data.draw(configs(pp, problem), label="config")
    layout = data.draw(paged_prefill_layouts(problem), label="layout")
    check_prefill(problem, config, "cuda", seed=data.draw(st.integers(0, 2**16), label="seed"), **layout)


@pytest.mark.gpu
def test_torch_compile_fullgraph():
    problem = Problem("paged_prefill", 3, 16, 2, 100, 300, 128, "bfloat16", True, 16)
    args = paged_prefill_inputs(problem, "cuda", seed=9, q_lens=[100, 1, 37], context_lens=[300, 64, 37])

    @torch.compile(fullgraph=True)
    def attend(q, *rest):
        return tunebench.paged_prefill(q * 1.0, *rest, check_values=False) * 2.0

    torch.testing.assert_close(attend(*args), tunebench.paged_prefill(*args) * 2.0)

"""An fp8 KV cache (float8_e4m3fn / float8_e5m2 with per-tensor or per-head scales): the decode kernel against the
float64 reference on the dequantised cache (the rule in tunebench/correctness.py), the cache write bit for bit
against the reference quantiser, every bad scale and dtype refused by name; and context_lens / block_tables read
through their strides (issue 16 item 1).
"""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import SHARDS
from strategies import all_configs, configs, paged_layouts, paged_problems
from tunebench.correctness import close_enough, poison
from tunebench.paged_inputs import fp8_paged_inputs, fp8_paged_references, fp8_scales, paged_inputs, paged_references
from tunebench.shapes import Problem
import tunebench
import tunebench.reference as ref
from tunebench.kernels import cache_write, paged_attention as pa

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def scale_form(scale: torch.Tensor, form: str):
    """A per-tensor scale as the caller may pass it: a Python float, a 0-d tensor or a [1] tensor."""
    return {"float": float(scale), "0-d": scale.reshape(()), "[1]": scale.reshape(1)}[form]


def check_fp8(problem, config, device, seed, kv_dtype, per_head, form="0-d", **layout):
    q, kc, vc, bt, cl, ks, vs = fp8_paged_inputs(problem, device, seed, kv_dtype, per_head, **layout)
    assert kc.dtype == vc.dtype == kv_dtype
    k_scale, v_scale = (s if per_head else scale_form(s, form) for s in (ks, vs))
    out = poison(torch.empty_like(q))
    assert pa.launch(q, kc, vc, bt, cl, config, out=out, k_scale=k_scale, v_scale=v_scale) is out
    verdict = close_enough(out, *fp8_paged_references(q, kc, vc, bt, cl, ks, vs))
    assert verdict.ok, f"{problem.label()} {kv_dtype} per_head={per_head} {form} {config} {layout}: {verdict.reason}"


@pytest.mark.parametrize("shard", range(SHARDS))
@given(data=st.data())
def test_fp8_cache_matches_the_reference_on_its_dequantised_values(device, shard, data):
    kv_dtype = data.draw(st.sampled_from(FP8), label="kv_dtype")
    problem = data.draw(paged_problems(), label="problem")
    # The config is drawn for the fp8 problem, so that keys for an fp8 cache alone (RESTAGE_V) are drawn too.
    fp8_problem = dataclasses.replace(problem, kv_dtype=str(kv_dtype).removeprefix("torch."))
    config = data.draw(configs(pa, fp8_problem), label="config")
    layout = data.draw(paged_layouts(problem), label="layout")
    check_fp8(problem, config, device, data.draw(st.integers(0, 2**16), label="seed"), kv_dtype,
              data.draw(st.booleans(), label="per_head"),
              data.draw(st.sampled_from(("float", "0-d", "[1]")), label="form"), **layout)


PINNED = [  # each names what it covers
    ("e4m3 per head, split, shared prefix", Problem("paged_attention", 3, 8, 2, 1, 300, 32, page=16),
     dict(pa.DEFAULT, BLOCK_N=32, PARTITION=128), torch.float8_e4m3fn, True, dict(shared_blocks=4)),
    ("e5m2 per tensor float, strided views", Problem("paged_attention", 2, 8, 2, 1, 70, 48, page=8),
     dict(pa.DEFAULT, PARTITION=0), torch.float8_e5m2, False, dict(strided=True)),
    ("fp32 query, e4m3, tile spans pages", Problem("paged_attention", 2, 4, 1, 1, 100, 16, "float32", page=8),
     dict(pa.DEFAULT, BLOCK_N=64, PARTITION=0), torch.float8_e4m3fn, True, {}),
    ("RESTAGE_V, e4m3 per head, split, a last page part full", Problem("paged_attention", 3, 8, 2, 1, 150, 32,
                                                                        page=16),
     dict(pa.DEFAULT, BLOCK_N=32, PARTITION=64, RESTAGE_V=1), torch.float8_e4m3fn, True, {}),
    ("RESTAGE_V, e5m2 per tensor, tile spans pages", Problem("paged_attention", 2, 4, 1, 1, 100, 16, page=8),
     dict(pa.DEFAULT, BLOCK_N=32, PARTITION=0, RESTAGE_V=1), torch.float8_e5m2, False, {}),
    ("RESTAGE_V, GQA 8, BLOCK_N 64", Problem("paged_attention", 2, 16, 2, 1, 200, 64, page=16),
     dict(pa.DEFAULT, BLOCK_N=64, PARTITION=128, RESTAGE_V=1), torch.float8_e4m3fn, True, {}),
]


@pytest.mark.parametrize("what, problem, config, kv_dtype, per_head, layout", PINNED, ids=[p[0] for p in PINNED])
def test_fp8_pinned(device, what, problem, config, kv_dtype, per_head, layout):
    assert pa.keep(config, dataclasses.replace(problem, kv_dtype=str(kv_dtype).removeprefix("torch."))) is None
    check_fp8(problem, config, device, 5, kv_dtype, per_head, "float", **layout)


def test_the_dispatcher_passes_the_scales(device):
    problem = Problem("paged_attention", 2, 8, 2, 1, 40, 32)
    q, kc, vc, bt, cl, ks, vs = fp8_paged_inputs(problem, device, 3, torch.float8_e4m3fn, True)
    verdict = close_enough(tunebench.paged_attention(q, kc, vc, bt, cl, k_scale=ks, v_scale=vs),
                           *fp8_paged_references(q, kc, vc, bt, cl, ks, vs))
    assert verdict.ok, verdict.reason


# --- the cache write quantises ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("per_head", (True, False))
@pytest.mark.parametrize("config", all_configs(cache_write, Problem("paged_attention", 1, 2, 2, 1, 13, 48))[::4])
def test_cache_write_quantises_like_the_reference_bit_for_bit(device, kv_dtype, per_head, config):
    T, Hkv, D, bs, num_blocks = 29, 2, 48, 8, 6
    g = torch.Generator().manual_seed(T)
    # Magnitudes from 1e-7 to 1e4: subnormals, ties, carries into the next binade and saturation all occur.
    key, value = ((torch.randn(T, Hkv, D, generator=g) * torch.logspace(-7, 4, T)[:, None, None]).half()
                  for _ in range(2))
    key[0, 0, :4] = torch.tensor([0.0, -0.0, 65504.0, -65504.0])
    k_scale = torch.tensor([0.37, 1.3]) if per_head else torch.tensor(0.37)
    v_scale = torch.tensor([2.0, 0.05]) if per_head else 0.05
    k_cache = torch.full((num_blocks, bs, Hkv, D), math.nan, device=device).to(kv_dtype)
    v_cache = k_cache.clone()
    slots = torch.randperm(num_blocks * bs, generator=g)[:T]
    slots[::5] = -1
    v_arg = v_scale if isinstance(v_scale, float) else v_scale.to(device)           # a float or a tensor
    cache_write.launch(key.to(device), value.to(device), k_cache, v_cache, slots.to(device), config,
                       k_scale=k_scale.to(device), v_scale=v_arg)
    ok = slots >= 0
    for cache, x, s in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        got = cache.flatten(0, 1).cpu()[slots[ok]]
        want = ref.quantize_fp8(x[ok], s, kv_dtype)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        # The round trip is within half a step of the fp8 grid (relative 2^-(mantissa+1)), or saturated.
        fmt = torch.finfo(kv_dtype)
        real = x[ok].double()
        back = ref.dequantize_fp8(got, s)
        sd = ref.dequantize_fp8(torch.ones(1, Hkv, 1), s)
        inside = real.abs() <= fmt.max * sd
        half_step = torch.maximum(real.abs() * fmt.eps / 2, fmt.smallest_normal * fmt.eps / 2 * sd)
        assert ((back - real).abs() <= half_step * (1 + 1e-9))[inside].all()
        assert (back.abs() == fmt.max * sd.expand_as(back))[~inside].all()
    untouched = torch.ones(num_blocks * bs, dtype=torch.bool)
    untouched[slots[ok]] = False
    assert torch.isnan(k_cache.flatten(0, 1).cpu()[untouched].float()).all()


def test_written_fp8_tokens_decode_like_the_reference(device):
    """Quantised by the cache write through a block table, then decoded: the same as the reference's quantisation."""
    problem = Problem("paged_attention", 2, 8, 2, 1, 37, 32, page=8)
    q, kc, vc, bt, cl = paged_inputs(problem, device, 9, shared_blocks=0, extra_columns=1)
    ks, vs = fp8_scales(kc, torch.float8_e4m3fn, True), fp8_scales(vc, torch.float8_e4m3fn, True)
    k8, v8 = (torch.zeros(kc.shape, device=device).to(torch.float8_e4m3fn) for _ in range(2))
    slots = torch.arange(kc.shape[0] * kc.shape[1], device=device)
    cache_write.launch(kc.flatten(0, 1), vc.flatten(0, 1), k8, v8, slots, dict(BLOCK_T=16, num_warps=1),
                       k_scale=ks, v_scale=vs)
    finite = ~torch.isnan(kc)        # rows no sequence reads hold NaN (Triton 3.6's interpreter writes it as 384)
    want = ref.quantize_fp8(kc, ks, torch.float8_e4m3fn)
    assert torch.equal(k8.view(torch.uint8)[finite], want.view(torch.uint8)[finite])
    out = pa.launch(q, k8, v8, bt, cl, k_scale=ks, v_scale=vs)
    verdict = close_enough(out, *fp8_paged_references(q, k8, v8, bt, cl, ks, vs))
    assert verdict.ok, verdict.reason


# --- bad input -----------------------------------------------------------------------------------------------------

def _fp8_args(device):
    problem = Problem("paged_attention", 2, 8, 2, 1, 20, 32)
    q, kc, vc, bt, cl, ks, vs = fp8_paged_inputs(problem, device, 0, torch.float8_e4m3fn, True)
    return dict(q=q, k_cache=kc, v_cache=vc, block_tables=bt, context_lens=cl, k_scale=ks, v_scale=vs)


BAD_SCALES = [
    (dict(k_scale=0.0), ValueError, "k_scale must be finite and > 0, got 0.0"),
    (dict(v_scale=-1.0), ValueError, "v_scale must be finite and > 0, got -1.0"),
    (dict(k_scale=math.nan), ValueError, "k_scale must be finite and > 0"),
    (dict(v_scale=math.inf), ValueError, "v_scale must be finite and > 0"),
    (dict(k_scale=torch.tensor([0.1, 0.0])), ValueError, "k_scale must be finite and > 0 everywhere"),
    (dict(v_scale=torch.tensor(-0.5)), ValueError, "v_scale must be finite and > 0 everywhere"),
    (dict(k_scale=torch.tensor([math.nan])), ValueError, "k_scale must be finite and > 0 everywhere"),
    (dict(v_scale=torch.tensor([0.1, math.inf])), ValueError, "v_scale must be finite and > 0 everywhere"),
    (dict(k_scale=torch.ones(3)), ValueError, r"k_scale must be 0-d or \[1\] .* \[Hkv\] = \[2\].*got shape \(3,\)"),
    (dict(v_scale=torch.ones(2, 1)), ValueError, r"v_scale must be 0-d or \[1\]"),
    (dict(k_scale=torch.ones(2, dtype=torch.float64)), TypeError, "k_scale must be float32, got torch.float64"),
    (dict(k_scale=torch.ones(2, device="meta")), ValueError, "k_scale is on meta but the cache is on"),
    (dict(v_scale="0.1"), TypeError, "v_scale must be a float or a float32 tensor, got str"),
    (dict(k_scale=None), TypeError, "k_scale is required for an fp8 cache"),
    (dict(v_scale=None), TypeError, "v_scale is required for an fp8 cache"),
]


@pytest.mark.parametrize("over, error, match", BAD_SCALES, ids=[b[2] for b in BAD_SCALES])
def test_bad_scales_are_refused_by_name(device, over, error, match):
    args = _fp8_args(device)
    # The table's tensors are made on the host; on a GPU the device check would answer before the value check.
    over = {n: s.to(device) if isinstance(s, torch.Tensor) and s.device.type == "cpu" else s for n, s in over.items()}
    with pytest.raises(error, match=match):
        pa.launch(**{**args, **over})
    k, v = args["k_cache"].float()[0], args["v_cache"].float()[0]           # [block_size, Hkv, D]
    scales = {n: args[n] for n in ("k_scale", "v_scale")}
    with pytest.raises(error, match=match):
        cache_write.launch(k.half(), v.half(), args["k_cache"], args["v_cache"],
                           torch.arange(k.shape[0], device=device), **{**scales, **over})


def test_cache_dtype_mismatches_are_refused_by_name(device):
    args = _fp8_args(device)
    with pytest.raises(TypeError, match="v_cache dtype torch.float8_e5m2 must match k_cache dtype"):
        pa.launch(**{**args, "v_cache": args["v_cache"].float().to(torch.float8_e5m2)})
    with pytest.raises(TypeError, match="v_cache dtype torch.float16 must match k_cache dtype"):
        pa.launch(**{**args, "v_cache": args["v_cache"].half()})
    plain = paged_inputs(Problem("paged_attention", 2, 8, 2, 1, 20, 32), device, 0)
    with pytest.raises(TypeError, match="k_scale is given but the cache is torch.float16"):
        pa.launch(*plain, k_scale=1.0, v_scale=1.0)
    with pytest.raises(TypeError, match="v_scale is given but the cache is torch.float16"):
        pa.launch(*plain, v_scale=torch.tensor(1.0))
    with pytest.raises(TypeError, match="k_scale is given"):
        cache_write.launch(plain[1][0], plain[2][0], plain[1], plain[2], torch.arange(16, device=device),
                           k_scale=1.0, v_scale=1.0)


def test_a_scale_written_in_place_is_checked_again(device):
    args = _fp8_args(device)
    pa.launch(**args)
    args["k_scale"][1] = 0.0                                  # bumps its version: the cached check no longer holds
    with pytest.raises(ValueError, match="k_scale must be finite and > 0 everywhere"):
        pa.launch(**args)


# --- strided integer inputs (issue 16 item 1) ----------------------------------------------------------------------

@pytest.mark.parametrize("partition", (0, 128))
def test_strided_context_lens_and_block_tables(device, partition):
    """context_lens a column of a [B, 3] metadata tensor whose neighbours are other lengths, block_tables every
    second column of a wider tensor whose other columns name an all-NaN spare block: read without their strides,
    the output is wrong or NaN."""
    problem = Problem("paged_attention", 3, 8, 2, 1, 300, 32, page=16)
    q, kc, vc, bt, cl = paged_inputs(problem, device, 4, context_lens=[300, 140, 17], extra_columns=0)
    spare = int(torch.isnan(kc.float()).flatten(1).all(1).nonzero()[0])
    meta = torch.stack([cl, torch.full_like(cl, 1), cl.flip(0)], dim=1)      # [B, 3]
    wide = torch.full((bt.shape[0], 2 * bt.shape[1]), spare, dtype=torch.int32, device=device)
    wide[:, ::2] = bt
    lens, tables = meta[:, 0], wide[:, ::2]
    assert lens.stride(0) == 3 and tables.stride(1) == 2
    config = dict(pa.DEFAULT, BLOCK_N=32, PARTITION=partition)
    for out in (pa.launch(q, kc, vc, tables, lens, config, out=poison(torch.empty_like(q))),
                tunebench.paged_attention(q, kc, vc, tables, lens)):
        verdict = close_enough(out, *paged_references(q, kc, vc, bt, cl))
        assert verdict.ok, verdict.reason


# --- GPU only: bf16 queries on fp8 caches at long contexts, and torch.compile --------------------------------------

LONG = [
    (Problem("paged_attention", 16, 32, 8, 1, 16384, 128, "bfloat16"), torch.float8_e4m3fn, True),
    (Problem("paged_attention", 2, 32, 8, 1, 33000, 128, "float16", page=64), torch.float8_e5m2, False),
    (Problem("paged_attention", 3, 16, 2, 1, 17000, 256, "bfloat16", page=8), torch.float8_e4m3fn, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("problem, kv_dtype, per_head", LONG, ids=[f"{p.label()}|{d}" for p, d, _ in LONG])
def test_fp8_long_contexts_on_gpu(problem, kv_dtype, per_head):
    for config in (pa.DEFAULT, dict(pa.DEFAULT, BLOCK_N=128, PARTITION=1024, RESTAGE_V=1),
                   tunebench.tuned_config(problem)):
        check_fp8(problem, config, "cuda", 11, kv_dtype, per_head, "[1]")


@pytest.mark.gpu
def test_fp8_under_torch_compile_fullgraph():
    problem = Problem("paged_attention", 3, 8, 2, 1, 70, 64, "bfloat16")
    q, kc, vc, bt, cl, ks, vs = fp8_paged_inputs(problem, "cuda", 2, torch.float8_e4m3fn, True)

    @torch.compile(fullgraph=True)
    def decode(q, kc, vc, bt, cl, ks):
        return tunebench.paged_attention(q, kc, vc, bt, cl, k_scale=ks, v_scale=0.5) * 2.0

    torch.testing.assert_close(decode(q, kc, vc, bt, cl, ks),
                               tunebench.paged_attention(q, kc, vc, bt, cl, k_scale=ks, v_scale=0.5) * 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("factor", [3e5, 3e-6], ids=["past fp16's range", "below fp16's normals"])
def test_bf16_query_rows_of_any_size_on_an_fp8_cache(factor):
    # bf16 queries on an fp8 cache run their dots in fp16 (F16), each q row scaled by a power of two into fp16's
    # range: one head of each GQA group scaled far out of it must not spoil that row or its neighbours.
    problem = Problem("paged_attention", 3, 16, 4, 1, 300, 128, "bfloat16", page=16)
    q, kc, vc, bt, cl, ks, vs = fp8_paged_inputs(problem, "cuda", 7, torch.float8_e4m3fn, True)
    q[:, ::4] *= factor
    for config in (pa.DEFAULT, dict(pa.DEFAULT, BLOCK_N=64, PARTITION=0), dict(pa.DEFAULT, BLOCK_N=128, RESTAGE_V=1)):
        out = poison(torch.empty_like(q))
        pa.launch(q, kc, vc, bt, cl, config, out=out, k_scale=ks, v_scale=vs)
        verdict = close_enough(out, *fp8_paged_references(q, kc, vc, bt, cl, ks, vs))
        assert verdict.ok, f"x{factor} {config}: {verdict.reason}"

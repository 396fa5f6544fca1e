"""The paged decode kernel and the cache-write kernel against the float64 paged reference.

Hypothesis draws the problem (GQA 1/4/8, head dims, lengths including 1 and exact multiples of the block size),
the layout (blocks in random order, sequences sharing a prefix of physical blocks, extra table columns, strided
views) and the config from SPACE as keep() admits it. Rows past every context hold NaN, so reading them fails.
"""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import SHARDS
from strategies import all_configs, configs, paged_layouts, paged_problems
from tunebench.paged_inputs import paged_inputs
from tunebench.correctness import close_enough, poison
from tunebench.shapes import PAGES, Problem, suite
import tunebench.reference as ref
from tunebench.kernels import cache_write, paged_attention as pa


def check_paged(problem, config, device, seed=0, scale=None, **layout):
    args = paged_inputs(problem, device, seed, **layout)
    assert args[1].shape[1] == problem.page
    out = poison(torch.empty_like(args[0]))
    assert pa.launch(*args, config=config, scale=scale, out=out) is out
    verdict = close_enough(out, ref.paged_attention(*args, scale=scale),
                           ref.paged_attention(*args, scale=scale, dtype=args[0].dtype))
    assert verdict.ok, f"{problem.label()} {config} {layout}: {verdict.reason}"


@pytest.mark.parametrize("shard", range(SHARDS))
@given(data=st.data())
def test_matches_reference(device, shard, data):
    problem = data.draw(paged_problems(), label="problem")
    config = data.draw(configs(pa, problem), label="config")
    layout = data.draw(paged_layouts(problem), label="layout")
    check_paged(problem, config, device, seed=data.draw(st.integers(0, 2**16), label="seed"), **layout)


@given(data=st.data())
def test_split_path_matches_reference(device, data):
    """Only the configs that split the longest sequence into several partitions (on CPU-sized contexts most
    admitted configs do not split), with shorter sequences whose trailing partitions are empty."""
    problem = data.draw(paged_problems(contexts=(129, 200, 256, 300)), label="problem")
    splitting = [c for c in all_configs(pa, problem) if 0 < c["PARTITION"] < problem.Nk]
    config = data.draw(st.sampled_from(splitting), label="config")
    layout = data.draw(paged_layouts(problem), label="layout")
    check_paged(problem, config, device, seed=data.draw(st.integers(0, 2**16), label="seed"), **layout)


def _cfg(**kw):
    return dict(pa.DEFAULT, **kw)


# Pinned cases: each names what it covers, whatever Hypothesis happens to draw.
PINNED = [
    ("length 1 everywhere", Problem("paged_attention", 3, 4, 1, 1, 1, 32), _cfg(), dict(context_lens=[1, 1, 1])),
    ("exact multiples, split", Problem("paged_attention", 2, 8, 2, 1, 256, 16, page=32),
     _cfg(BLOCK_N=64, PARTITION=128), dict(context_lens=[256, 128])),
    ("empty partitions for the short sequence", Problem("paged_attention", 2, 8, 1, 1, 300, 16),
     _cfg(BLOCK_N=32, PARTITION=128), dict(context_lens=[300, 1], extra_columns=3)),
    ("shared prefix, tile spans pages", Problem("paged_attention", 3, 4, 4, 1, 100, 32, page=8),
     _cfg(BLOCK_N=64, PARTITION=0), dict(context_lens=[100, 97, 40], shared_blocks=12)),
    ("tile inside a page", Problem("paged_attention", 2, 16, 2, 1, 200, 64, page=128),
     _cfg(BLOCK_N=32, PARTITION=128), dict(context_lens=[200, 129], shared_blocks=1)),
    ("non-power-of-two head dim, strided", Problem("paged_attention", 2, 8, 2, 1, 70, 48, page=16),
     _cfg(), dict(context_lens=[70, 33], strided=True)),
    ("fp32", Problem("paged_attention", 1, 4, 1, 1, 150, 16, "float32"), _cfg(BLOCK_N=16, PARTITION=128), {}),
    ("group above 64 split over programs", Problem("paged_attention", 1, 72, 1, 1, 40, 16), _cfg(), {}),
]


@pytest.mark.parametrize("what, problem, config, layout", PINNED, ids=[p[0] for p in PINNED])
def test_pinned(device, what, problem, config, layout):
    assert pa.keep(config, problem) is None
    check_paged(problem, config, device, seed=7, **layout)


def test_scale_and_out_none(device):
    problem = Problem("paged_attention", 2, 4, 2, 1, 20, 16)
    args = paged_inputs(problem, device, seed=1)
    out = pa.launch(*args, scale=0.3)                       # config None: DEFAULT, on the cache's block size
    verdict = close_enough(out, ref.paged_attention(*args, scale=0.3),
                           ref.paged_attention(*args, scale=0.3, dtype=out.dtype))
    assert out.shape == args[0].shape and verdict.ok, verdict.reason
    args8 = paged_inputs(dataclasses.replace(problem, page=8), device, seed=1)
    assert args8[1].shape[1] == 8 and pa.launch(*args8).shape == args[0].shape   # and on pages of 8


@pytest.mark.parametrize("partition", (0, 128))
def test_zero_length_gives_zeros(device, partition):
    problem = Problem("paged_attention", 2, 4, 2, 1, 130, 16)
    q, kc, vc, bt, cl = paged_inputs(problem, device, seed=2, context_lens=[130, 5])
    cl[1] = 0
    out = pa.launch(q, kc, vc, bt, cl, _cfg(PARTITION=partition), out=poison(torch.empty_like(q)))
    assert (out[1] == 0).all()
    verdict = close_enough(out[:1], ref.paged_attention(q[:1], kc, vc, bt[:1], cl[:1]),
                           ref.paged_attention(q[:1], kc, vc, bt[:1], cl[:1], dtype=q.dtype))
    assert verdict.ok, verdict.reason


def test_default_admitted_and_keep_rejects_what_cannot_fit():
    drawn = [Problem("paged_attention", 1, g * h, h, 1, n, d, dt) for g in (1, 8, 72, 128) for h in (1, 8)
             for n in (1, 32768) for d in (16, 80, 256) for dt in ("float16", "bfloat16", "float32")]
    paged = [p for p in suite("default") + suite("tiny") if p.paged] + drawn
    for problem in paged:
        for page in PAGES:
            assert pa.keep(pa.DEFAULT, dataclasses.replace(problem, page=page)) is None, problem
    big = Problem("paged_attention", 1, 8, 1, 1, 4096, 256, "float32")
    assert "shared memory" in pa.keep(_cfg(BLOCK_N=128, num_stages=4), big)
    assert "register" in pa.keep(_cfg(BLOCK_N=128, num_warps=2, num_stages=1),
                                 Problem("paged_attention", 1, 8, 1, 1, 4096, 256))
    assert "multiple" in pa.keep(_cfg(BLOCK_N=128, PARTITION=192), Problem("paged_attention", 1, 8, 1, 1, 4096, 64))


def test_every_admitted_config_is_a_valid_launch_config():
    problem = Problem("paged_attention", 64, 32, 8, 1, 4096, 128, "bfloat16")
    admitted = all_configs(pa, problem)
    assert len(admitted) > 100
    assert all(pa._check_config(c) is c for c in admitted)
    assert "BLOCK_SIZE" not in pa.SPACE and "BLOCK_SIZE" not in pa.DEFAULT    # the page is the problem's


def _inputs(device, **over):
    problem = Problem("paged_attention", 2, 8, 2, 1, 20, 32)
    q, kc, vc, bt, cl = paged_inputs(problem, device, seed=0)
    args = dict(q=q, k_cache=kc, v_cache=vc, block_tables=bt, context_lens=cl)
    args.update(over)
    return args


BAD = [
    (lambda a: dict(q=a["q"][0]), ValueError, "q must be 3-d"),
    (lambda a: dict(k_cache=a["k_cache"][0]), ValueError, "k_cache must be 4-d"),
    (lambda a: dict(q=a["q"].float()), TypeError, "k_cache dtype"),
    (lambda a: dict(q=a["q"].int(), k_cache=a["k_cache"].int(), v_cache=a["v_cache"].int()), TypeError, "float16"),
    (lambda a: dict(block_tables=a["block_tables"].long()), TypeError, "block_tables must be int32"),
    (lambda a: dict(context_lens=a["context_lens"].long()), TypeError, "context_lens must be int32"),
    (lambda a: dict(v_cache=a["v_cache"][:, :8]), ValueError, "must equal v_cache shape"),
    (lambda a: dict(q=a["q"][:, :7]), ValueError, "multiple of cache heads"),
    (lambda a: dict(q=a["q"][..., :16]), ValueError, "head dim"),
    (lambda a: dict(block_tables=a["block_tables"][:1]), ValueError, "batch 2 rows"),
    (lambda a: dict(context_lens=a["context_lens"][:1]), ValueError, "batch 2 rows"),
    (lambda a: dict(out=torch.empty(2, 8, 16, dtype=a["q"].dtype, device=a["q"].device)), ValueError, "out shape"),
    (lambda a: dict(out=torch.empty(2, 8, 32, device=a["q"].device)), TypeError, "out dtype"),
    (lambda a: dict(config=_cfg(BLOCK_SIZE=16)), ValueError, "not a config key: the page size is the cache's layout"),
    (lambda a: dict(k_cache=a["k_cache"][:, :12], v_cache=a["v_cache"][:, :12]), ValueError,
     r"block size \(shape\[1\]\) must be a power of two, got 12"),
    (lambda a: dict(config=_cfg(PARTITION=48)), ValueError, "PARTITION"),
    (lambda a: dict(config={"BLOCK_N": 32}), ValueError, "missing keys"),
    (lambda a: dict(scale=math.inf), ValueError, "scale"),
]


@pytest.mark.parametrize("mutate, error, match", BAD, ids=[b[2] for b in BAD])
def test_rejects_bad_inputs(device, mutate, error, match):
    args = _inputs(device)
    args.update(mutate(args))
    with pytest.raises(error, match=match):
        pa.launch(**args)


def test_partitions_past_the_grid_limit_are_rejected(device):
    args = _inputs(device)
    wide = torch.zeros(2, 65536 * 128 // 16, dtype=torch.int32, device=device)    # 65536 partitions of 128 tokens
    with pytest.raises(ValueError, match="PARTITION=128.*65536 exceeds the grid limit 65535; use a larger PARTITION"):
        pa.launch(**dict(args, block_tables=wide, config=_cfg(PARTITION=128)))


def test_head_dim_mismatch_and_unsupported_head_dim(device):
    args = _inputs(device)
    with pytest.raises(ValueError, match="head dim"):
        pa.launch(**dict(args, q=torch.randn(2, 8, 16, device=device).half()))
    problem = Problem("paged_attention", 1, 2, 1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"head dim D must be in \[16, 256\]"):
        pa.launch(*paged_inputs(problem, device, seed=0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU check applies without a GPU")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        pa.launch(**_inputs("cpu"))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        cache_write.launch(*_write_args("cpu", torch.int32)[:5])


# --- cache write ----------------------------------------------------------------------------------------------------

def _write_args(device, slot_dtype, T=13, Hkv=2, D=48, bs=8, num_blocks=6):
    g = torch.Generator().manual_seed(T)
    key, value = (torch.randn(T, Hkv, D, generator=g).half().to(device) for _ in range(2))
    k_cache = torch.full((num_blocks, bs, Hkv, D), math.nan, dtype=torch.float16, device=device)
    v_cache = k_cache.clone()
    slots = torch.randperm(num_blocks * bs, generator=g)[:T]
    slots[::4] = -1                                             # padding tokens are skipped
    return key, value, k_cache, v_cache, slots.to(slot_dtype).to(device), g


@pytest.mark.parametrize("slot_dtype", (torch.int32, torch.int64))
@pytest.mark.parametrize("config", all_configs(cache_write, Problem("paged_attention", 1, 2, 2, 1, 13, 48))[::3])
def test_cache_write_puts_each_token_in_its_slot(device, slot_dtype, config):
    key, value, k_cache, v_cache, slots, _ = _write_args(device, slot_dtype)
    cache_write.launch(key, value, k_cache, v_cache, slots, config)
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)   # [num_blocks * bs, Hkv, D], slot-indexed
    ok = slots >= 0
    assert torch.equal(flat_k[slots[ok].long()], key[ok]) and torch.equal(flat_v[slots[ok].long()], value[ok])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=device)
    untouched[slots[ok].long()] = False
    assert torch.isnan(flat_k[untouched]).all() and torch.isnan(flat_v[untouched]).all()


def test_written_tokens_decode_like_the_dense_reference(device):
    """Tokens written through slots from a block table (blocks out of order, a strided key) are what decode reads."""
    B, Hq, Hkv, D, bs, lens = 2, 8, 2, 32, 8, [19, 7]
    g = torch.Generator().manual_seed(3)
    tables = torch.tensor([[4, 0, 6], [2, 5, -1]], dtype=torch.int32)
    k, v = (torch.randn(B, Hkv, max(lens), D, generator=g).half() for _ in range(2))
    slots = torch.tensor([int(tables[b, i // bs]) * bs + i % bs if i < lens[b] else -1
                          for b in range(B) for i in range(max(lens))])
    kc = torch.full((7, bs, Hkv, D), math.nan, dtype=torch.float16, device=device)
    vc = kc.clone()
    # key and value are views into one fused [T, 2, Hkv, D] tensor, as a KV projection's output would be.
    fused = torch.stack([t.transpose(1, 2).reshape(-1, Hkv, D) for t in (k, v)], dim=1).to(device)
    key, value = fused[:, 0], fused[:, 1]
    cache_write.launch(key, value, kc, vc, slots.to(device))
    q = torch.randn(B, Hq, D, generator=g).half().to(device)
    cl = torch.tensor(lens, dtype=torch.int32, device=device)
    out = pa.launch(q, kc, vc, tables.to(device), cl, dict(pa.DEFAULT, BLOCK_N=16, PARTITION=0))
    for b, n in enumerate(lens):
        dense = [t[b:b + 1, :, :n].to(device) for t in (k, v)]
        want = ref.attention(q[b:b + 1, :, None], *dense)[:, :, 0]
        lowp = ref.attention(q[b:b + 1, :, None], *dense, dtype=torch.float16)[:, :, 0]
        verdict = close_enough(out[b:b + 1], want, lowp)
        assert verdict.ok, verdict.reason


def test_fork_and_decode_with_the_allocator(device):
    """Allocator + cache write + decode: a forked sequence and its parent each append their own tokens (the first
    append copies the shared, partly filled last block) and each decodes against its own token history."""
    from tunebench.runtime.allocator import BlockAllocator
    Hq, Hkv, D, bs, prompt = 4, 2, 16, 8, 13
    g = torch.Generator().manual_seed(5)
    alloc = BlockAllocator(num_blocks=8, block_size=bs)
    kc = torch.full((8, bs, Hkv, D), math.nan, dtype=torch.float16, device=device)
    vc = kc.clone()
    history = {"parent": [torch.randn(prompt, Hkv, D, generator=g).half() for _ in range(2)]}

    def write(slots, k, v):
        cache_write.launch(k.to(device), v.to(device), kc, vc, torch.tensor(slots, device=device))

    write(alloc.allocate("parent", prompt), *history["parent"])
    alloc.fork("parent", "child")
    history["child"] = list(history["parent"])
    for _ in range(2):
        slots = [alloc.append(s) for s in ("parent", "child")]
        for src, dst in alloc.take_copies():
            kc[dst], vc[dst] = kc[src], vc[src]
        new = [torch.randn(2, Hkv, D, generator=g).half() for _ in range(2)]
        write(slots, *new)
        for i, s in enumerate(("parent", "child")):
            history[s] = [torch.cat([h, n[i:i + 1]]) for h, n in zip(history[s], new)]
    seqs = ("parent", "child")
    q = torch.randn(2, Hq, D, generator=g).half().to(device)
    tables, lens = alloc.block_tables(seqs, device), alloc.context_lens(seqs, device)
    out = pa.launch(q, kc, vc, tables, lens, dict(pa.DEFAULT, BLOCK_N=16))
    for b, s in enumerate(seqs):
        k, v = (h.transpose(0, 1)[None].to(device) for h in history[s])      # [1, Hkv, n, D]
        want = ref.attention(q[b:b + 1, :, None], k, v)[:, :, 0]
        lowp = ref.attention(q[b:b + 1, :, None], k, v, dtype=torch.float16)[:, :, 0]
        verdict = close_enough(out[b:b + 1], want, lowp)
        assert verdict.ok, f"{s}: {verdict.reason}"


def test_cache_write_rejects_bad_inputs(device):
    key, value, kc, vc, slots, _ = _write_args(device, torch.int32)
    with pytest.raises(TypeError, match="slot_mapping must be int32 or int64"):
        cache_write.launch(key, value, kc, vc, slots.float())
    with pytest.raises(ValueError, match="slot_mapping has 12 entries"):
        cache_write.launch(key, value, kc, vc, slots[:12])
    with pytest.raises(TypeError, match="k_cache dtype"):
        cache_write.launch(key, value, kc.float(), vc.float(), slots)
    with pytest.raises(ValueError, match="must match the cache"):
        cache_write.launch(key[:, :1], value[:, :1], kc, vc, slots)
    with pytest.raises(ValueError, match="key must be 3-d"):
        cache_write.launch(key[0], value, kc, vc, slots)
    assert cache_write.keep(cache_write.DEFAULT, Problem("paged_attention", 1, 1, 1, 1, 1, 256, "float32")) is None


# --- GPU only: long contexts, bf16, head dim 256 -------------------------------------------------------------------

LONG = [
    (Problem("paged_attention", 2, 32, 8, 1, 20000, 128, "bfloat16"), _cfg(), dict(context_lens=[20000, 3])),
    (Problem("paged_attention", 2, 32, 8, 1, 20000, 128, "bfloat16"), _cfg(BLOCK_N=64, PARTITION=0),
     dict(context_lens=[20000, 16384], shared_blocks=512)),
    (Problem("paged_attention", 1, 8, 1, 1, 33000, 256, "float16", page=128),
     _cfg(BLOCK_N=64, PARTITION=1024, num_warps=8), {}),
    (Problem("paged_attention", 3, 16, 2, 1, 17000, 64, "bfloat16", page=8),
     _cfg(BLOCK_N=128, PARTITION=2048, num_stages=3), dict(context_lens=[17000, 16384, 1])),
    (Problem("paged_attention", 1, 64, 8, 1, 65536, 128, "bfloat16", page=64),
     _cfg(BLOCK_N=128, PARTITION=256, num_warps=8, num_stages=3), {}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("problem, config, layout", LONG, ids=[f"{p.label()}|{c}" for p, c, _ in LONG])
def test_long_contexts_on_gpu(problem, config, layout):
    assert pa.keep(config, problem) is None
    check_paged(problem, config, "cuda", seed=11, **layout)

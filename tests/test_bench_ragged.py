"""The bench's ragged decode batch (tunebench/bench/ragged.py): its lengths, its byte count, and its providers checked
against the float64 reference of each sequence's own tokens."""
import dataclasses
import statistics

import pytest
import torch
from hypothesis import given, strategies as st

from tunebench.bench import providers, ragged
from tunebench.bench.measure import OK, SKIPPED, WRONG, run_problem
from tunebench.bench.providers import Provider, Runner
from tunebench.registry import kernel_module
from tunebench.shapes import Problem

# Small enough for the Triton interpreter: 5 sequences of 1..100 tokens, mean 40, over pages of 16.
SMALL = ragged.ragged_decode(B=5, Hq=4, Hkv=2, D=32, dtype="float16", page=16, mean=40, max_len=100, min_len=1,
                             seed=3)


def test_the_headline_batch_is_seeded_long_tailed_with_mean_2k_and_max_32k():
    (r,) = ragged.headline()
    assert (r.B, r.Hq, r.Hkv, r.D, r.dtype, r.page, r.Nq) == (64, 32, 8, 128, "bfloat16", 16, 1)
    assert r == ragged.ragged_decode() and r.lengths == ragged.ragged_decode().lengths      # seeded
    assert ragged.ragged_decode(seed=1).lengths != r.lengths
    assert sum(r.lengths) == 64 * 2048 and max(r.lengths) == r.Nk == 32768 and min(r.lengths) >= 16
    assert statistics.median(r.lengths) < 0.6 * 2048                 # long-tailed: most sequences short
    assert "ragged(lognormal sigma 1 seed 0, mean 2048, max 32768" in r.label()


@given(batch=st.integers(1, 80), min_len=st.integers(1, 64), span=st.integers(0, 40000), data=st.data(),
       sigma=st.floats(0.2, 2.0), seed=st.integers(0, 2**16))
def test_lengths_have_exactly_the_stated_mean_and_max(batch, min_len, span, data, sigma, seed):
    max_len = min_len + span
    mean = data.draw(st.integers(-(-((batch - 1) * min_len + max_len) // batch), max_len), label="mean")
    lengths = ragged.long_tailed_lengths(batch, mean, max_len, min_len, sigma, seed)
    assert len(lengths) == batch and all(type(n) is int for n in lengths)
    assert sum(lengths) == mean * batch and max(lengths) == max_len and min(lengths) >= min_len
    assert lengths == ragged.long_tailed_lengths(batch, mean, max_len, min_len, sigma, seed)


def test_impossible_or_inconsistent_batches_are_refused():
    with pytest.raises(ValueError, match="no 4 lengths in \\[16, 100\\] with one at 100 have mean 20"):
        ragged.long_tailed_lengths(4, 20, 100, 16)                  # one at 100 already makes the mean 25 or more
    with pytest.raises(ValueError, match="mean must be an int >= 1"):
        ragged.long_tailed_lengths(4, 20.5, 100)
    with pytest.raises(ValueError, match="lengths must be B=2 ints >= 1"):
        ragged.RaggedDecode("paged_attention", 2, 4, 2, 1, 10, 16, lengths=(10,))
    with pytest.raises(ValueError, match="Nk \\(12\\) must be the longest length \\(10\\)"):
        ragged.RaggedDecode("paged_attention", 2, 4, 2, 1, 12, 16, lengths=(10, 3))
    with pytest.raises(ValueError, match="paged decode problem"):
        ragged.RaggedDecode("flash_v2", 2, 4, 2, 1, 10, 16, lengths=(10, 3))


def test_bytes_and_flops_count_the_tokens_actually_read():
    r = ragged.headline()[0]
    per_token = 2 * r.Hkv * r.D * 2                                  # K and V, bf16
    assert r.tokens == sum(r.lengths) and r.kv_bytes == sum(r.lengths) * per_token
    padded = r.padded()
    assert type(padded) is Problem and padded.kv_bytes == r.B * r.Nk * per_token    # 16x more than is read
    assert r.throughput(1.0) == pytest.approx(r.kv_bytes / 1e-3 / 1e9)
    assert r.flops == 4 * r.Hq * r.D * sum(r.lengths)
    assert r.min_bytes == r.kv_bytes + 2 * r.B * r.Hq * r.D * 2


def _wall(fn):
    fn()
    return (1.0, 1.0, 1.0)


def _unmasked(inp):
    """Dense SDPA on the padded K/V with no mask: reads the random padding, so it must be caught as wrong."""
    import torch.nn.functional as F
    p = inp.problem
    q4 = inp.q.reshape(p.B, p.Hkv, p.group, p.D)
    return Runner(lambda: F.scaled_dot_product_attention(q4, inp.k, inp.v).reshape(p.B, p.Hq, p.D))


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:tunebench. no tuned configs")
def test_ragged_providers_agree_with_each_sequences_float64_reference(device):
    names = ["tunebench-paged", "tunebench-paged-default", "sdpa-padded", "sdpa-loop", "sdpa-dense-flash",
             "gather-sdpa"]
    chosen = providers.select_providers(names) + [Provider("unmasked", "decode", True, _unmasked, "", True)]
    got = {m.provider: m for m in run_problem(SMALL, chosen, device=device, timer=_wall, graph_timer=_wall)}
    for name in ("tunebench-paged", "tunebench-paged-default", "sdpa-padded", "sdpa-loop"):
        assert got[name].status == OK and got[name].err_ratio <= 1, (name, got[name].note)
    assert "K/V padded to 100" in got["sdpa-padded"].note and "5 SDPA calls" in got["sdpa-loop"].note
    for name in ("sdpa-dense-flash", "gather-sdpa"):
        assert got[name].status == SKIPPED and "ragged batch needs padding" in got[name].note
    assert got["unmasked"].status == WRONG


@pytest.mark.interpreter
def test_the_split_kernel_and_its_reduce_are_right_on_a_ragged_batch(device):
    module = kernel_module("paged_attention")
    inputs = ragged.make_inputs(SMALL, device, seed=0)
    assert inputs.context_lens.tolist() == list(SMALL.lengths)
    config = dict(module.DEFAULT, BLOCK_N=16, PARTITION=32)         # up to 4 partitions, some sequences in one
    out = torch.full_like(inputs.q, float("nan"))
    module.launch(inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_tables, inputs.context_lens,
                  config=config, out=out)
    verdict = ragged.reference_for(inputs).check(out)
    assert verdict.ok, verdict.reason


def test_the_padding_bias_masks_exactly_each_sequences_padding():
    inputs = ragged.make_inputs(dataclasses.replace(SMALL, dtype="float32"), "cpu")
    bias = ragged.padding_bias(inputs)
    assert bias.shape == (SMALL.B, 1, 1, SMALL.Nk) and bias.dtype == torch.float32
    for b, n in enumerate(SMALL.lengths):
        assert (bias[b, 0, 0, :n] == 0).all() and torch.isinf(bias[b, 0, 0, n:]).all()


def test_a_ragged_rows_throughput_and_goal_count_the_sum_of_lengths():
    from tunebench.bench import tables
    from tunebench.bench.measure import GRAPH, Ceilings, Measurement
    r = ragged.headline()[0]
    ms = [Measurement(r, "tunebench-paged", False, OK, r.kv_bytes / 3.0e12 * 1e3, timed_by=GRAPH, launch_ms=1.0),
          Measurement(r, "sdpa-loop", True, OK, r.kv_bytes / 1.5e12 * 1e3, timed_by=GRAPH, launch_ms=2.0)]
    rows = tables.rows(ms, Ceilings(4.0e12))
    paged = next(x for x in rows if x["provider"] == "tunebench-paged")
    assert paged["throughput"] == pytest.approx(3000) and paged["kv_tokens"] == 64 * 2048
    assert paged["ragged"] == r.recipe and paged["vs_best_peer"] == pytest.approx(2.0)
    (line,) = tables.summary(rows)
    assert "75% of copy bandwidth (goal >= 90%" in line and "2.00x best peer sdpa-loop (goal >= 1.2)" in line

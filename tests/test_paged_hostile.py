"""Hostile paged inputs (issue 16): the paged kernels never read or write out of bounds, whatever the values of the
integer inputs. Hypothesis draws a valid case (problem, config from the kernel's SPACE as keep() admits it, layout),
then corrupts some sequences: a length past the table or negative (or, for prefill, below the new tokens), a block id
past the pool, 2**31 - 1, negative. The integer tensors are strided views whose neighbouring elements are 2**31 - 1,
so a kernel that ignores a stride reads a hostile value. Then:
- every good sequence is still correct (float64 reference, tunebench.correctness's rule), beside the bad ones;
- every row that reads a bad value is NaN (outputs are poisoned with NaN first, so the good rows prove they were
  written): all of a bad sequence's rows for a bad length, and for a bad block id at least the rows whose causal keys
  reach that block. A prefill row whose keys end before it does not depend on it, so it is NaN (its tile read the
  block) or correct, never a wrong answer;
- with check=True the launch raises a ValueError naming each bad sequence and its bad value.
Never a crash (a segfault would end the test process). Malformed cu_seqlens_q has its own pinned cases.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import SHARDS
from strategies import configs, paged_layouts, paged_prefill_layouts, paged_prefill_problems, paged_problems
import tunebench
from tunebench.correctness import close_enough, poison
from tunebench.paged_inputs import (fp8_paged_inputs, fp8_paged_references, paged_inputs, paged_prefill_inputs,
                                    paged_prefill_references, paged_references)
from tunebench.runtime import dispatch
from tunebench.shapes import Problem
from tunebench.kernels import cache_write, paged_attention as pa, paged_prefill as pp

HOSTILE = 2**31 - 1
CPU_EXAMPLES = 10         # per kernel: the interpreter takes about half a second per example
GPU_EXAMPLES = 200


def strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view whose last dim has stride 2, the elements between them 2**31 - 1."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), HOSTILE, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


@st.composite
def corruptions(draw, lens: list, q_lens: list, capacity: int, page: int, num_blocks: int, prefill: bool) -> dict:
    """{sequence: (what, value, table column or None)} for some sequences; the others stay good. A block id is only
    corrupted where the kernel reads it: among a sequence's first ceil(length / page) entries, and (prefill) only if
    the sequence has new tokens."""
    bad = {}
    for b, (n, n_new) in enumerate(zip(lens, q_lens)):
        kinds = ["good", "length past", "length negative"]
        if n_new:
            kinds += ["id past", "id negative"] + (["length below new"] if prefill else [])
        kind = draw(st.sampled_from(kinds), label=f"sequence {b}")
        if kind == "length past":
            bad[b] = (kind, draw(st.sampled_from((capacity + 1, capacity + page, HOSTILE))), None)
        elif kind == "length negative":
            bad[b] = (kind, draw(st.sampled_from((-1, -page, -2**31))), None)
        elif kind == "length below new":
            bad[b] = (kind, n_new - 1, None)
        elif kind.startswith("id"):
            values = (num_blocks, num_blocks + 1000, HOSTILE) if kind == "id past" else (-1, -3, -2**31)
            bad[b] = (kind, draw(st.sampled_from(values)), draw(st.integers(0, -(-n // page) - 1)))
    return bad


def corrupt(tables: torch.Tensor, lens: torch.Tensor, bad: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Strided copies of the block tables and lengths with the drawn corruptions written in."""
    tables, lens = tables.clone(), lens.clone()
    for b, (kind, value, column) in bad.items():
        if column is None:
            lens[b] = value
        else:
            tables[b, column] = value
    return strided(tables), strided(lens)


def check_outcome(out, refs, rows_of, bad: dict, launch_checked, reads: dict | None = None):
    """Good sequences' rows pass the tolerance rule; a bad sequence's rows that read its bad value (reads[b], else all
    its rows) are all NaN, and each of its other rows is NaN or passes the rule; check=True names each bad one."""
    reads = reads or {}
    spared = []
    for b in bad:
        must = reads.get(b, rows_of[b])
        assert out[must].isnan().all(), f"sequence {b} {bad[b]}: a row that reads it is not NaN"
        spared += [r for r in rows_of[b] if r not in must and not out[r].isnan().all()]
    good_rows = [r for b in range(len(rows_of)) if b not in bad for r in rows_of[b]] + spared
    if good_rows:
        verdict = close_enough(out[good_rows], refs[0][good_rows], refs[1][good_rows])
        assert verdict.ok, f"a good sequence, or a bad one's row that never reads its bad value {bad}: {verdict.reason}"
    if not bad:
        launch_checked()
        return
    with pytest.raises(ValueError) as err:
        launch_checked()
    message = str(err.value)
    for b, (kind, value, column) in bad.items():
        assert f"sequence {b}:" in message and str(value) in message, f"{kind} of sequence {b}: {message}"


def hostile_decode(device, data):
    problem = data.draw(paged_problems(), label="problem")
    config = data.draw(configs(pa, problem), label="config")
    layout = data.draw(paged_layouts(problem), label="layout")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    fp8 = data.draw(st.sampled_from((None, torch.float8_e4m3fn)), label="fp8 cache")
    if fp8 is None:
        q, k, v, tables, lens = paged_inputs(problem, device, seed, **layout)
        scales, refs = {}, paged_references(q, k, v, tables, lens)
    else:
        q, k, v, tables, lens, k_scale, v_scale = fp8_paged_inputs(problem, device, seed, fp8, False, **layout)
        scales, refs = dict(k_scale=k_scale, v_scale=v_scale), fp8_paged_references(q, k, v, tables, lens, k_scale,
                                                                                     v_scale)
    capacity = tables.shape[1] * problem.page
    bad = data.draw(corruptions(lens.tolist(), [1] * problem.B, capacity, problem.page, k.shape[0], False), label="bad")
    tables, lens = corrupt(tables, lens, bad)
    out = poison(torch.empty_like(q))
    pa.launch(q, k, v, tables, lens, config=config, out=out, **scales)
    check_outcome(out, refs, [[b] for b in range(problem.B)], bad,
                  lambda: pa.launch(q, k, v, tables, lens, config=config, check=True, **scales))


def hostile_prefill(device, data):
    problem = data.draw(paged_prefill_problems(), label="problem")
    config = data.draw(configs(pp, problem), label="config")
    layout = data.draw(paged_prefill_layouts(problem), label="layout")
    seed = data.draw(st.integers(0, 2**16))
    prefill_case(device, problem, config, layout, seed,
                 lambda *facts: data.draw(corruptions(*facts, True), label="bad"))


def prefill_case(device, problem, config, layout, seed, draw_bad):
    """One hostile paged prefill case; draw_bad(lens, q_lens, capacity, page, num_blocks) -> {sequence: corruption}."""
    q, k, v, tables, cu, lens = paged_prefill_inputs(problem, device, seed, **layout)
    refs = paged_prefill_references(q, k, v, tables, cu, lens)
    starts, ctx = cu.tolist(), lens.tolist()
    q_lens = [e - s for s, e in zip(starts, starts[1:])]
    capacity = tables.shape[1] * problem.page
    bad = draw_bad(ctx, q_lens, capacity, problem.page, k.shape[0])
    tables, lens = corrupt(tables, lens, bad)
    cu = strided(cu)
    out = poison(torch.empty_like(q))
    pp.launch(q, k, v, tables, cu, lens, config=config, out=out, check_values=False)
    rows_of = [list(range(s, e)) for s, e in zip(starts, starts[1:])]
    # New token i of sequence b sees keys 0 .. ctx - n_new + i: it reads a bad column c once that reaches c * page.
    reads = {b: [r for i, r in enumerate(rows_of[b]) if ctx[b] - q_lens[b] + i >= column * problem.page]
             for b, (kind, value, column) in bad.items() if column is not None}
    check_outcome(out, refs, rows_of, bad,
                  lambda: pp.launch(q, k, v, tables, cu, lens, config=config, check_values=False, check=True), reads)
    return out


KERNELS = {"decode": hostile_decode, "prefill": hostile_prefill}


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=CPU_EXAMPLES)
@given(data=st.data())
def test_hostile_inputs(device, kernel, data):
    KERNELS[kernel](device, data)


# On a GPU: GPU_EXAMPLES per kernel in all, split into SHARDS items so that `pytest -n 8` compiles on several cores.
@pytest.mark.gpu
@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=max(1, GPU_EXAMPLES // SHARDS))
@given(data=st.data())
def test_hostile_inputs_gpu(device, kernel, shard, data):
    KERNELS[kernel](device, data)


# -- pinned cases ----------------------------------------------------------------------------------------------------

DECODE = Problem("paged_attention", 3, 4, 1, 1, 40, 16, page=8)


def test_context_lens_column_of_a_metadata_tensor(device):
    """Issue 16's first finding: context_lens = meta[:, 0], its neighbours huge, read through its stride."""
    q, k, v, tables, lens = paged_inputs(DECODE, device, 3, context_lens=[40, 17, 9], strided=False)
    meta = torch.full((3, 4), HOSTILE, dtype=torch.int32, device=device)
    meta[:, 0] = lens
    for config in (pa.DEFAULT, dict(pa.DEFAULT, BLOCK_N=16, PARTITION=16)):     # one launch, and the split's two
        out = pa.launch(q, k, v, tables, meta[:, 0], config=config, check=True)
        assert close_enough(out, *paged_references(q, k, v, tables, lens)).ok


def test_public_api_check_and_environment(device, monkeypatch):
    q, k, v, tables, lens = paged_inputs(DECODE, device, 4, context_lens=[40, 17, 9])
    lens[1] = 41 + tables.shape[1] * 8
    out = tunebench.paged_attention(q, k, v, tables, lens)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
    with pytest.raises(ValueError, match=r"sequence 1: context_lens\[1\]=\d+ is outside \[0, \d+\]"):
        tunebench.paged_attention(q, k, v, tables, lens, check=True)
    monkeypatch.setattr(dispatch, "ENV_CHECK", True)
    with pytest.raises(ValueError, match="sequence 1"):
        tunebench.paged_attention(q, k, v, tables, lens)
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="sequence 1"):
        tunebench.paged_prefill(q, k, v, tables, cu, lens, check_values=False)


def test_environment_switch():
    for value, on in (("1", True), ("yes", True), ("0", False), ("", False)):
        assert dispatch.check_from_environment({"TUNEBENCH_CHECK": value}) is on
    assert dispatch.check_from_environment({}) is False


PREFILL = Problem("paged_prefill", 3, 4, 2, 4, 30, 16, causal=True, page=8)
# cu_seqlens_q of 4 + 3 + 2 = 9 rows, made hostile: (cu, the sequences flagged).
BAD_ROWS = [
    ([0, 4, 2, 9], {1}),               # decreasing: sequence 1 has -2 rows
    ([1, 4, 7, 9], {0}),               # does not start at 0
    ([0, 4, 7, 8], {2}),               # ends before total_q
    ([0, 4, 7, HOSTILE], {2}),         # past q's rows
    ([0, -5, 7, 9], {0, 1}),           # negative
]


@pytest.mark.parametrize("cu, flagged", BAD_ROWS, ids=[str(c) for c, _ in BAD_ROWS])
def test_malformed_cu_seqlens_q(device, cu, flagged):
    """Rows out of order or out of bounds: no crash and nothing written out of bounds; the sequence is flagged
    (check=True), and check_values (the default) refuses it before the launch."""
    q, k, v, tables, _, lens = paged_prefill_inputs(PREFILL, device, 5, q_lens=[4, 3, 2], context_lens=[30, 12, 2])
    cu = strided(torch.tensor(cu, dtype=torch.int32, device=device))
    out = torch.empty_like(q)
    pp.launch(q, k, v, tables, cu, lens, out=out, check_values=False)
    with pytest.raises(ValueError) as err:
        pp.launch(q, k, v, tables, cu, lens, check_values=False, check=True)
    for b in flagged:
        assert f"sequence {b}: cu_seqlens_q[{b}]=" in str(err.value)
    with pytest.raises(ValueError):
        pp.launch(q, k, v, tables, cu, lens)


def test_a_bad_block_id_spares_the_prefill_rows_that_never_reach_it(device):
    """Found on an H200 (200 examples): one 33-token prompt, page 8, its table's column 1 (keys 8-15) past the pool.
    With BLOCK_M 16 over 4 query heads per KV head a tile holds 4 tokens, so tokens 0-7 never read column 1: they are
    correct, and every token from 8 on is NaN; check=True names the sequence."""
    problem = Problem("paged_prefill", 1, 8, 2, 33, 33, 64, "float16", causal=True, page=8)
    layout = dict(context_lens=[33], shared_blocks=3, extra_columns=2, strided=False, q_lens=[33])
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=4)
    out = prefill_case(device, problem, config, layout, 176,
                       lambda lens, q_lens, capacity, page, num_blocks: {0: ("id past", num_blocks, 1)})
    assert not out[:8].isnan().any() and out[8:].isnan().all()


def test_no_blocks_at_all(device):
    q, k, v, tables, lens = paged_inputs(DECODE, device, 6, context_lens=[40, 17, 9])
    k, v = k[:0], v[:0]
    out = pa.launch(q, k, v, tables, lens)
    assert out.isnan().all()
    with pytest.raises(ValueError, match="the cache has no blocks"):
        pa.launch(q, k, v, tables, lens, check=True)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_cache_write_skips_slots_past_the_cache(device, slot_dtype):
    """Slots at or past num_blocks x block_size write nothing (the cache's bytes are all as they were but the good
    token's); check=True names them. A negative slot stays padding, never an error."""
    kc = torch.zeros(4, 8, 2, 16, dtype=torch.float16, device=device)
    vc = torch.zeros_like(kc)
    key = torch.randn(5, 2, 16, device=device).to(torch.float16)
    value = torch.randn_like(key)
    slots = strided(torch.tensor([5, 32, HOSTILE, -1, 2**40 if slot_dtype == torch.int64 else -2**31],
                                 dtype=slot_dtype, device=device))
    cache_write.launch(key, value, kc, vc, slots, dict(BLOCK_T=2, num_warps=1))
    expect_k, expect_v = torch.zeros_like(kc), torch.zeros_like(vc)
    expect_k.view(-1, 2, 16)[5], expect_v.view(-1, 2, 16)[5] = key[0], value[0]
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)
    with pytest.raises(ValueError) as err:
        cache_write.launch(key, value, kc, vc, slots, check=True)
    named = "slot_mapping[1]=32, slot_mapping[2]=2147483647" + (", slot_mapping[4]=1099511627776"
                                                               if slot_dtype == torch.int64 else "")
    assert str(err.value).endswith(named) and "num_blocks 4 x block_size 8 = 32 slots" in str(err.value)

"""The reference itself, against PyTorch's SDPA in float64, and the tolerance rule."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import tunebench.reference as ref
from tunebench.correctness import close_enough, poison


@settings(max_examples=25)
@given(B=st.integers(1, 2), hkv=st.sampled_from((1, 2)), group=st.sampled_from((1, 3, 4)),
       nq=st.integers(1, 40), nk=st.integers(1, 40), D=st.sampled_from((8, 16, 24)), causal=st.booleans())
def test_reference_matches_sdpa(B, hkv, group, nq, nk, D, causal):
    g = torch.Generator().manual_seed(nq * 100 + nk)
    q = torch.randn(B, hkv * group, nq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, hkv, nk, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = None
    if causal:  # bottom-right: query i sees key j iff j <= i + nk - nq
        mask = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
    out = ref.attention(q, k, v, causal)
    expect = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                            attn_mask=mask)
    seen = mask.any(-1) if causal else torch.ones(nq, dtype=torch.bool)
    torch.testing.assert_close(out[..., seen, :], expect[..., seen, :])
    assert (out[..., ~seen, :] == 0).all()          # rows that see no key are zero, not NaN


def test_reference_default_scale_and_rejects_bad_gqa():
    q, k, v = (torch.randn(1, 2, 4, 16, dtype=torch.float64) for _ in range(3))
    a = ref.attention(q, k, v, scale=1 / math.sqrt(16))
    torch.testing.assert_close(a, ref.attention(q, k, v))
    with pytest.raises(ValueError, match="multiple"):
        ref.attention(torch.randn(1, 3, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))


def test_paged_reference_gathers_through_the_block_table():
    bs, hkv, D, n = 4, 2, 8, 10
    k, v = torch.randn(1, hkv, n, D, dtype=torch.float64), torch.randn(1, hkv, n, D, dtype=torch.float64)
    table = torch.tensor([[5, 1, 3]], dtype=torch.int32)
    kc, vc = torch.randn(6, bs, hkv, D, dtype=torch.float64), torch.randn(6, bs, hkv, D, dtype=torch.float64)
    for i in range(n):
        kc[table[0, i // bs], i % bs], vc[table[0, i // bs], i % bs] = k[0, :, i], v[0, :, i]
    q = torch.randn(1, 4, D, dtype=torch.float64)
    out = ref.paged_attention(q, kc, vc, table, torch.tensor([n], dtype=torch.int32))
    torch.testing.assert_close(out, ref.attention(q[:, :, None], k, v)[:, :, 0])


def test_close_enough_rule():
    ref64 = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    lowp = ref64.half()
    assert close_enough(ref64.half(), ref64, lowp).ok
    bad = ref64.half()
    bad[0, 0, 0, 0] += 0.5
    verdict = close_enough(bad, ref64, lowp)
    assert not verdict.ok and verdict.ratio > 1
    unwritten = ref64.half()
    unwritten[1, 2, 4, 15] = math.nan
    assert not close_enough(unwritten, ref64, lowp).ok
    assert torch.isnan(poison(torch.empty(3, dtype=torch.float16))).all()
    assert not close_enough(ref64.half()[..., :8], ref64, lowp).ok

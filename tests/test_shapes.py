import math

import pytest
from hypothesis import given, strategies as st

from tunebench.shapes import PRESETS, Problem, bucket, bucket_distance, bucket_key, preset_problems, suite, SUITES


@given(B=st.integers(1, 300), nq=st.integers(1, 40000), nk=st.integers(1, 40000))
def test_bucket_is_idempotent_and_covers_the_shape(B, nq, nk):
    p = Problem("flash_v2", B, 8, 2, nq, nk, 64, "float16", causal=True)
    b = bucket(p)
    assert bucket(b) == b and bucket_key(b) == bucket_key(p)
    assert b.B >= B and b.Nq >= nq and b.Nk >= nk and b.B < 2 * B and b.Nq < 2 * nq and b.Nk < 2 * nk
    assert (b.kernel, b.Hq, b.Hkv, b.D, b.dtype, b.causal) == (p.kernel, p.Hq, p.Hkv, p.D, p.dtype, p.causal)


def test_bucket_distance_never_crosses_kernel_dtype_headdim_or_causality():
    a = Problem("flash_v2", 4, 32, 8, 4096, 4096, 128, "bfloat16", causal=True)
    assert bucket_distance(a, a) == 0
    assert bucket_distance(a, Problem("flash_v2", 4, 32, 8, 2048, 2048, 128, "bfloat16", causal=True)) == 2
    for other in (Problem("flash_v1", 4, 32, 8, 4096, 4096, 128, "bfloat16", causal=True),
                  Problem("flash_v2", 4, 32, 8, 4096, 4096, 64, "bfloat16", causal=True),
                  Problem("flash_v2", 4, 32, 8, 4096, 4096, 128, "float16", causal=True),
                  Problem("flash_v2", 4, 32, 8, 4096, 4096, 128, "bfloat16", causal=False)):
        assert bucket_distance(a, other) == math.inf


@pytest.mark.parametrize("bad", [dict(dtype="int8"), dict(Hq=3, Hkv=2), dict(D=0)])
def test_problem_rejects_bad_fields(bad):
    fields = dict(kernel="flash_v2", B=1, Hq=4, Hkv=2, Nq=8, Nk=8, D=16, dtype="float16") | bad
    with pytest.raises(ValueError):
        Problem(**fields)


def test_suites_and_presets_are_well_formed():
    for name in SUITES:
        assert suite(name), name
    assert {p.kernel for p in suite("default")} == {"flash_v2", "flash_v1", "paged_attention"}
    for name in PRESETS:
        probs = preset_problems(name)
        assert any(p.paged for p in probs) and any(not p.paged for p in probs)
    with pytest.raises(KeyError, match="unknown suite"):
        suite("nope")


def test_the_default_suite_covers_the_default_presets_prefill_and_decode_grids():
    from tunebench.shapes import DECODE_MAX_TOKENS, DEFAULT_PRESETS, PAGES
    default = suite("default")
    keys = [bucket_key(p) for p in default]
    assert len(keys) == len(set(keys))                                  # one problem per bucket
    for name in DEFAULT_PRESETS:
        for p in preset_problems(name, ("flash_v2", "paged_attention")):
            assert bucket_key(p) in keys, (name, p.label())
    llama = [p for p in default if (p.Hq, p.Hkv, p.D, p.dtype) == (32, 8, 128, "bfloat16")]
    assert {p.Nk for p in llama if p.kernel == "flash_v2" and p.causal} == {512 << i for i in range(7)}  # 512-32k
    decode = [p for p in llama if p.paged and p.page == 16]
    assert {1, 8, 64, 256} <= {p.B for p in decode} and {1024, 131072} <= {p.Nk for p in decode}
    assert all(p.B * p.Nk <= DECODE_MAX_TOKENS for p in decode)
    assert {p.page for p in default if p.paged} == set(PAGES)
    assert {p.D for p in default if p.kernel == "flash_v2"} == {64, 128}


def test_flops_and_bytes():
    p = Problem("flash_v2", 4, 16, 16, 4096, 4096, 128, "float16")
    assert p.flops == 4 * 4 * 16 * 4096 * 4096 * 128
    assert Problem("paged_attention", 2, 8, 2, 1, 100, 64, "bfloat16").min_bytes == 2 * (2 * 8 + 2 * 2 * 100) * 64 * 2


def test_a_paged_problem_carries_its_page_and_a_dense_one_none():
    assert Problem("paged_attention", 2, 8, 2, 1, 100, 64).page == 16                  # the documented default
    p = Problem("paged_attention", 2, 8, 2, 1, 100, 64, page=32)
    assert bucket(p).page == 32 and "page32" in bucket_key(p) and "page32" in p.label()
    assert bucket_key(p) != bucket_key(Problem("paged_attention", 2, 8, 2, 1, 100, 64, page=16))
    assert bucket_distance(p, Problem("paged_attention", 2, 8, 2, 1, 100, 64, page=16)) == math.inf
    assert Problem("flash_v2", 1, 2, 2, 8, 8, 16).page is None and "page" not in bucket_key(Problem("flash_v2", 1, 2, 2, 8, 8, 16))


@pytest.mark.parametrize("kernel, page, match", [
    ("paged_attention", 24, r"page .* must be a power of two in 8\.\.128 \(8, 16, 32, 64, 128\), got 24"),
    ("paged_attention", 4, "got 4"), ("paged_attention", 256, "got 256"), ("paged_attention", 16.0, "got 16.0"),
    ("paged_attention", True, "got True"), ("flash_v2", 16, "flash_v2 is dense and takes page=None, got 16"),
])
def test_a_bad_page_is_refused_naming_it(kernel, page, match):
    nq = 1 if kernel == "paged_attention" else 8
    with pytest.raises(ValueError, match=match):
        Problem(kernel, 1, 2, 2, nq, 8, 16, page=page)


def test_the_pages_suite_tunes_every_page_and_decode_stays_at_16():
    pages = suite("pages")
    assert {p.page for p in pages} == {8, 16, 32, 64, 128} and len({bucket_key(p) for p in pages}) == len(pages)
    assert {(p.B, p.Nk, p.Hq, p.Hkv, p.D, p.dtype) for p in pages} == {(64, 4096, 32, 8, 128, "bfloat16"),
                                                                      (16, 16384, 32, 8, 128, "bfloat16")}
    assert {p.page for p in suite("decode")} == {16}

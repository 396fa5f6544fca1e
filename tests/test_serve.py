"""Continuous batching end to end (examples/serve.py): chunked prefill, mixed decode + prefill steps through
tunebench.paged_prefill, decode-only steps through tunebench.paged_attention, and preemption when blocks run out,
every request's tokens equal to a dense SDPA reference's, token for token."""
import importlib.util
import pathlib
import sys

import pytest

_spec = importlib.util.spec_from_file_location(
    "serve", pathlib.Path(__file__).resolve().parents[1] / "examples" / "serve.py")
serve = sys.modules["serve"] = importlib.util.module_from_spec(_spec)   # dataclasses look it up
_spec.loader.exec_module(serve)

# 5 requests over one 24-token system prompt, pages of 8, 16 new tokens a step: every prompt is prefilled in chunks.
SMALL_RUN = dict(n=5, system_len=24, suffix=(3, 12), max_tokens=(2, 6), block_size=8, token_budget=16)


@pytest.fixture(scope="module")
def small(device):
    return serve.run(serve.SMALL, device=device, **SMALL_RUN)


def test_tokens_equal_the_dense_reference(small):
    (r,) = small["runs"]
    assert r["tokens"] == small["expected"]
    assert [len(t) for t in r["tokens"].values()] == [q.max_tokens for q in small["requests"]]
    assert len(r["ttft"]) == 5 and 0 < r["ttft"][0] <= r["ttft"][-1] <= r["seconds"]


def test_prompts_are_chunked_and_steps_mix_decode_rows_with_prefill_chunks(small):
    (r,) = small["runs"]
    assert r["chunked"] == 5 and r["mixed_steps"] > 0 and r["decode_steps"] > 0
    assert r["preemptions"] == 0 and r["stats"].used_blocks == 0          # every block is back at the end


def test_a_tight_pool_preempts_and_the_recomputed_requests_still_match(device):
    """Two 19-token prompts take 3 pages of 8 each, all 6 of the pool; the first to decode past token 24 needs a 4th
    page, so the other is preempted, then recomputed (prompt and generated tokens) once the first is done."""
    out = serve.run(serve.SMALL, n=2, system_len=16, suffix=(3, 3), max_tokens=(8, 8), block_size=8, token_budget=64,
                    num_blocks=6, device=device)
    (r,) = out["runs"]
    assert r["preemptions"] > 0
    assert r["tokens"] == out["expected"]


def test_the_script_exits_1_when_a_token_differs(small, monkeypatch, capsys):
    rid = small["requests"][0].rid
    wrong = dict(small, expected={**small["expected"], rid: [t + 1 for t in small["expected"][rid]]})
    monkeypatch.setattr(serve, "run", lambda *a, **kw: wrong)
    assert serve.main(["--small"]) == 1
    assert f"request {rid} differs from token 0 on" in capsys.readouterr().out
    monkeypatch.setattr(serve, "run", lambda *a, **kw: small)
    assert serve.main(["--small"]) == 0


def test_a_request_larger_than_the_pool_is_refused(device):
    with pytest.raises(ValueError, match="needs more blocks than the pool's 2"):
        serve.run(serve.SMALL, device=device, **dict(SMALL_RUN, num_blocks=2))


@pytest.mark.gpu
def test_default_workload_on_gpu():
    out = serve.run(serve.ModelConfig(), n=16, device="cuda")
    (r,) = out["runs"]
    assert r["tokens"] == out["expected"]

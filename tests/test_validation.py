"""One validation rule for every public entry point (issue 16): flash_attention (v1 and v2), paged_attention and
paged_prefill refuse, with a clear error and before anything is launched, a scale that is not finite and positive, a
causal that is not a bool, an input that is not a tensor (a TypeError naming it, not an AttributeError from inside
dispatch), an input that requires grad ("forward only: no autograd"), and bfloat16 under the Triton interpreter (where
it computes garbage). The checks live in kernels/_launch.py (check_call, check_dense_inputs, check_scale)."""
import math
import types

import pytest
import torch

import tunebench
from tunebench.kernels import _launch, flash_v1, flash_v2, paged_attention, paged_prefill

H = 16  # head dim


def dense(device, dtype=torch.float16, **changes):
    g = torch.Generator().manual_seed(0)
    args = dict(q=torch.randn(1, 2, 16, H, generator=g), k=torch.randn(1, 1, 16, H, generator=g),
                v=torch.randn(1, 1, 16, H, generator=g))
    return {name: changes.get(name, t.to(device, dtype)) for name, t in args.items()}


def paged(device, dtype=torch.float16, **changes):
    """Two sequences (20 and 5 tokens) over four 16-token pages."""
    g = torch.Generator().manual_seed(0)
    args = dict(q=torch.randn(2, 2, H, generator=g).to(device, dtype),
                k_cache=torch.randn(4, 16, 1, H, generator=g).to(device, dtype),
                v_cache=torch.randn(4, 16, 1, H, generator=g).to(device, dtype),
                block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device),
                context_lens=torch.tensor([20, 5], dtype=torch.int32, device=device))
    return {**args, **changes}


def prefill(device, dtype=torch.float16, **changes):
    """The same cache; sequence 0 adds 2 new tokens, sequence 1 adds 1."""
    args = paged(device, dtype)
    args["q"] = torch.randn(3, 2, H, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    args["cu_seqlens_q"] = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    order = ("q", "k_cache", "v_cache", "block_tables", "cu_seqlens_q", "context_lens")
    return {name: changes.get(name, args[name]) for name in order}


ENTRY_POINTS = {
    "flash v2": (lambda a, **kw: tunebench.flash_attention(**a, **kw), dense),
    "flash v1": (lambda a, **kw: tunebench.flash_attention(**a, variant="v1", **kw), dense),
    "paged_attention": (lambda a, **kw: tunebench.paged_attention(**a, **kw), paged),
    "paged_prefill": (lambda a, **kw: tunebench.paged_prefill(**a, **kw), prefill),
}
ENTRY = list(ENTRY_POINTS)


@pytest.mark.parametrize("entry", ENTRY)
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, -1.0, 0.0])
def test_scale_must_be_finite_and_positive(entry, scale, device):
    call, inputs = ENTRY_POINTS[entry]
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        call(inputs(device), scale=scale)


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("causal", ["no", 1, None])
def test_causal_must_be_a_bool(variant, causal, device):
    with pytest.raises(TypeError, match="causal must be a bool"):
        tunebench.flash_attention(**dense(device), causal=causal, variant=variant)


NOT_TENSORS = {"flash v2": "k", "flash v1": "v", "paged_attention": "block_tables", "paged_prefill": "cu_seqlens_q"}


@pytest.mark.parametrize("entry", ENTRY)
@pytest.mark.parametrize("which", ["q", "other"])
def test_a_list_instead_of_a_tensor_is_a_type_error_naming_it(entry, which, device):
    call, inputs = ENTRY_POINTS[entry]
    name = "q" if which == "q" else NOT_TENSORS[entry]
    args = inputs(device)
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor, got list$"):
        call(args)


@pytest.mark.parametrize("entry", ENTRY)
def test_inputs_that_require_grad_are_refused_unless_grad_is_off(entry, device):
    call, inputs = ENTRY_POINTS[entry]
    args = inputs(device)
    args["q"] = args["q"].detach().requires_grad_()
    with pytest.raises(ValueError, match="q requires grad, but tunebench's kernels are forward only: no autograd"):
        call(args)
    with torch.no_grad():
        out = call(args)
    expected = call({**args, "q": args["q"].detach()})
    assert out.grad_fn is None and torch.isfinite(out).all() and torch.equal(out, expected)


@pytest.mark.parametrize("launch", [flash_v1.launch, flash_v2.launch], ids=["flash_v1", "flash_v2"])
def test_the_dense_kernels_own_launch_applies_the_same_rule(launch, device):
    args = dense(device)
    args["k"] = args["k"].detach().requires_grad_()
    with pytest.raises(ValueError, match="k requires grad"):
        launch(**args)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        launch(**dense(device), scale=math.nan)


@pytest.mark.parametrize("kernel, inputs", [(paged_attention, paged), (paged_prefill, prefill)],
                         ids=["paged_attention", "paged_prefill"])
def test_the_paged_kernels_own_launch_applies_the_same_rule(kernel, inputs, device):
    args = inputs(device)
    args["k_cache"] = args["k_cache"].detach().requires_grad_()
    with pytest.raises(ValueError, match="k_cache requires grad"):
        kernel.launch(**args)
    if _launch.interpreting():
        with pytest.raises(TypeError, match="q is bfloat16"):
            kernel.launch(**inputs(device, torch.bfloat16))


@pytest.mark.skipif(not _launch.interpreting(), reason="the Triton interpreter's rule (on a GPU bfloat16 runs)")
@pytest.mark.parametrize("entry", ENTRY)
def test_bfloat16_under_the_interpreter_is_refused(entry, device):
    call, inputs = ENTRY_POINTS[entry]
    with pytest.raises(TypeError, match="q is bfloat16, which the Triton .* interpreter computes wrongly"):
        call(inputs(device, torch.bfloat16))


@pytest.mark.skipif(not _launch.interpreting(), reason="the Triton interpreter's rule")
def test_the_bfloat16_rule_spares_the_cache_write_which_is_exact(device):
    from tunebench.kernels import cache_write
    key, value = (torch.randn(5, 1, H).bfloat16().to(device) for _ in range(2))
    k_cache, v_cache = (torch.zeros(2, 4, 1, H, dtype=torch.bfloat16, device=device) for _ in range(2))
    cache_write.launch(key, value, k_cache, v_cache, torch.arange(5, dtype=torch.int32, device=device))
    assert torch.equal(k_cache.view(-1, 1, H)[:5], key) and torch.equal(v_cache.view(-1, 1, H)[:5], value)


@pytest.mark.parametrize("case", ["requires grad", "bfloat16"])
def test_the_transformers_backend_falls_back_to_sdpa_where_the_rule_refuses(case, monkeypatch, device):
    """Training through attn_implementation="tunebench" keeps its gradients (SDPA runs, with one warning), and bf16
    on the interpreter gets SDPA's answer rather than an error or garbage."""
    backend = pytest.importorskip("tunebench.integrations.transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if case == "bfloat16" and not _launch.interpreting():
        pytest.skip("the Triton interpreter's rule (on a GPU bfloat16 runs)")
    monkeypatch.setattr(backend, "_warned", set())
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=2)
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    q, k, v = (torch.randn(1, h, 8, H, dtype=dtype, device=device) for h in (4, 2, 2))
    if case == "requires grad":
        q.requires_grad_()
    with pytest.warns(backend.FallbackWarning, match="require grad" if case == "requires grad" else "bfloat16"):
        out, _ = backend.attention_forward(module, q, k, v, None)
    assert torch.equal(out, sdpa_attention_forward(module, q, k, v, None, is_causal=True)[0])
    if case == "requires grad":
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()

"""tunebench.bounds: under the interpreter, a load or store outside the elements of a kernel's tensor arguments is an
error (the CPU gate runs every test inside it: conftest.bounds_checked). Masked lanes are free to point anywhere."""
import pytest
import torch
import triton
import triton.language as tl

import conftest  # noqa: F401  (sets TRITON_INTERPRET before any kernel is imported)
from tunebench.bounds import OutOfBounds, checked

pytestmark = pytest.mark.skipif(conftest.HAS_GPU, reason="the checks run under the Triton interpreter (CPU gate)")


@triton.jit
def _copy(X, Y, shift, stride, n, N: tl.constexpr, MASKED: tl.constexpr):
    """Y[i] = X[(i + shift) * stride] for i < N; MASKED: only the lanes with i + shift < n."""
    i = tl.arange(0, N)
    if MASKED:
        ok = i + shift < n
        tl.store(Y + i, tl.load(X + (i + shift) * stride, mask=ok, other=0.0), mask=ok)
    else:
        tl.store(Y + i, tl.load(X + (i + shift) * stride))


def run(x, y, shift=0, stride=1, n=0, masked=False, lanes=None):
    with checked():
        _copy[(1,)](x, y, shift, stride, n, N=lanes or y.numel(), MASKED=masked)


def raises_out_of_bounds(match):
    # The interpreter wraps a kernel's exception in its InterpreterError, whose message carries ours.
    return pytest.raises(Exception, match=f"OutOfBounds.*{match}")


def test_a_read_past_the_end_is_named():
    x, y = torch.randn(16), torch.empty(16)
    run(x, y)
    assert torch.equal(y, x)
    with raises_out_of_bounds(r"_copy: a load of 1 of 16 unmasked lanes .* nearest argument: X \(element offset 16"):
        run(x, y, shift=1)


def test_masked_lanes_are_not_checked():
    x, y = torch.randn(16), torch.full((16,), float("nan"))
    run(x, y, shift=4, n=16, masked=True)     # lanes 12..15 would read past the end: masked off
    assert torch.equal(y[:12], x[4:]) and y[12:].isnan().all()


def test_a_write_past_the_end_is_named():
    with raises_out_of_bounds("a store of 8 of 16 unmasked lanes .* nearest argument: Y"):
        run(torch.randn(16), torch.empty(8), lanes=16)


def test_a_strided_views_neighbours_are_out_of_bounds():
    """context_lens given as a column of a metadata tensor: its neighbours lie in the same storage but are not its
    elements (issue 16's first finding: a kernel that ignored the stride read them)."""
    meta = torch.randn(16, 4)
    column, y = meta[:, 0], torch.empty(16)
    run(column, y, stride=4)                 # the column's own elements, read through its stride
    assert torch.equal(y, column)
    with raises_out_of_bounds("nearest argument: X"):
        run(column, y, stride=1)             # read as if contiguous: the neighbours


def test_a_permuted_view_is_in_bounds_everywhere():
    x = torch.randn(4, 8).t()                # 8 x 4, strides (1, 8): every element addressed once
    y = torch.empty(32)
    run(x, y)
    assert torch.equal(y, x.t().reshape(-1))

"""The gate's own plumbing: a printed repro reproduces the case it names, layout included."""
import shlex

import pytest
import torch

import tunebench.reference as ref
from tunebench import gate
from tunebench.shapes import Problem

PAGED = Problem("paged_attention", 2, 4, 2, 1, 40, 16, "float32", page=8)


class _RecordingPaged:
    """A stand-in paged kernel: records whether it was given strided views, and writes the right answer."""
    strided: list = []

    @classmethod
    def launch(cls, q, k_cache, v_cache, tables, lens, config, out):
        assert k_cache.shape[1] == PAGED.page                   # the cache is laid out in the problem's page size
        cls.strided.append(not (q.is_contiguous() and k_cache.is_contiguous()))
        return out.copy_(ref.paged_attention(q, k_cache, v_cache, tables, lens, dtype=q.dtype))


def test_the_layout_a_paged_repro_prints_is_the_layout_it_runs(monkeypatch):
    monkeypatch.setattr(gate, "kernel_module", lambda name: _RecordingPaged)
    _RecordingPaged.strided = []
    for seed in range(6):
        for layout in ("bhnd", "bnhd"):
            assert gate.check_case(PAGED, {"BLOCK_N": 16}, "cpu", seed, layout).ok
    assert _RecordingPaged.strided == [False, True] * 6


def test_repro_command_round_trips_through_the_cli_parser():
    from tunebench.cli import build_parser
    from tunebench.commands.check import _shape
    cmd = gate.repro_command(PAGED, {"BLOCK_N": 16}, 7, "bnhd")
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert (args.kernel, args.seed, args.layout) == (["paged_attention"], 7, "bnhd")
    assert Problem(kernel="paged_attention", **_shape(args.shape)) == PAGED      # the page size included


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        gate.check_case(Problem("flash_v2", 1, 2, 2, 8, 8, 16, "float32"), {}, "cpu", 0, "nhbd")


class _ReadsPastQ:
    """A stand-in dense kernel whose Triton launch reads one element past the end of q (harmless under the
    interpreter, which read stray host memory without a word before tunebench.bounds)."""

    @staticmethod
    def launch(q, k, v, config=None, *, causal=False, scale=None, out=None):
        import triton
        import triton.language as tl

        @triton.jit
        def _copy_shifted(Q, O, n, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(O + i, tl.load(Q + i + 1), mask=i < n)

        n = q.numel()
        _copy_shifted[(1,)](q, out, n, BLOCK=triton.next_power_of_2(n))
        return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bounds check runs under the Triton interpreter (CPU gate)")
def test_a_kernel_that_reads_out_of_bounds_fails_its_gate_case(monkeypatch):
    monkeypatch.setattr(gate, "kernel_module", lambda name: _ReadsPastQ)
    with pytest.raises(Exception, match=r"OutOfBounds.*_copy_shifted: a load of 1 of \d+ unmasked lanes.*Q"):
        gate.check_case(Problem("flash_v2", 1, 1, 1, 4, 4, 16, "float32"), {}, "cpu", 0, "bhnd")

"""What the dispatcher says to its user: the no-winners warning points at the caller's own line (whatever the call
path's depth) and words itself for the device it runs on; a bad variant is a ValueError naming the known ones."""
import warnings

import pytest
import torch

import tunebench
from tunebench.shapes import Problem
from test_dispatch import db  # noqa: F401 - the fixture: an empty user database, the packaged one switched off

PROBLEM = Problem("flash_v2", 1, 2, 1, 40, 40, 32, "float16", causal=True)


def _warning(call) -> warnings.WarningMessage:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    [w] = [w for w in caught if "no tuned configs" in str(w.message)]
    return w


@pytest.mark.parametrize("via", ["flash_attention", "explain"])
def test_the_no_winners_warning_points_at_the_callers_line(db, device, via):  # noqa: F811
    q = torch.randn(1, 2, 40, 32, dtype=torch.float16, device=device)
    k = v = torch.randn(1, 1, 40, 32, dtype=torch.float16, device=device)
    if via == "flash_attention":
        w = _warning(lambda: tunebench.flash_attention(q, k, v, causal=True))
    else:
        w = _warning(lambda: tunebench.explain(q, k, causal=True))
    assert w.filename == __file__, w.filename
    assert "lambda" in open(__file__).read().splitlines()[w.lineno - 1]


def test_the_no_winners_warning_is_worded_for_the_device(db, device):  # noqa: F811
    text = str(_warning(lambda: tunebench.explain(PROBLEM)).message)
    if device == "cpu":
        assert "the Triton interpreter" in text and "tunebench tune --interpret" in text
        assert "GPU to tune" not in text and "on this GPU" not in text
    else:
        assert torch.cuda.get_device_name() in text and "run `tunebench tune` on this gpu" in text.lower()


def test_an_unknown_variant_is_a_value_error_naming_the_known_ones(device):
    q = torch.randn(1, 2, 40, 32, dtype=torch.float16, device=device)
    for call in (lambda: tunebench.explain(q, q, variant="v9"),
                 lambda: tunebench.flash_attention(q, q, q, variant="v9")):
        with pytest.raises(ValueError, match=r"variant must be one of \['auto', 'v1', 'v2', 'v3'\], got 'v9'"):
            call()

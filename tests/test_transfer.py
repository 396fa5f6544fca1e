"""Safe transfer to untuned buckets: a config runs there only if it beat DEFAULT in every neighbouring tuned bucket."""
import math

from hypothesis import given, strategies as st

from tunebench.registry import config_key
from tunebench.runtime import transfer
from tunebench.shapes import Problem

DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64}
BIG = {"BLOCK_M": 128, "BLOCK_N": 64}
SMALL = {"BLOCK_M": 32, "BLOCK_N": 32}


def dense(B, N, Hq=16, Hkv=16, causal=False, dtype="bfloat16"):
    return Problem("flash_v2", B, Hq, Hkv, N, N, 128, dtype, causal)


def evidence(problem, **ms):
    e = transfer.Evidence(problem)
    for name, t in ms.items():
        e.add({"DEFAULT": DEFAULT, "BIG": BIG, "SMALL": SMALL}[name], t)
    return e


def always(config):
    return True


def test_a_config_that_wins_in_every_neighbour_is_transferred_with_its_evidence():
    near = [evidence(dense(4, 2048), DEFAULT=1.0, BIG=0.8, SMALL=0.7),
            evidence(dense(4, 8192), DEFAULT=4.0, BIG=3.2, SMALL=4.4)]   # SMALL loses here: not safe
    choice = transfer.choose(dense(4, 4096), near, DEFAULT, always)
    assert choice.config == BIG
    assert [round(g, 2) for g in choice.gains] == [1.25, 1.25]
    assert "B4|H16/16|Nq2048" in choice.why() and "1.25x" in choice.why()


def test_no_transfer_on_one_neighbour_a_narrow_win_or_another_family():
    one = [evidence(dense(4, 2048), DEFAULT=1.0, BIG=0.5)]
    assert transfer.choose(dense(4, 4096), one, DEFAULT, always) is None
    narrow = [evidence(dense(4, 2048), DEFAULT=1.0, BIG=0.99), evidence(dense(4, 8192), DEFAULT=1.0, BIG=0.5)]
    assert transfer.choose(dense(4, 4096), narrow, DEFAULT, always) is None          # 1.01x is within the noise
    causal = [evidence(dense(4, n, causal=True), DEFAULT=1.0, BIG=0.5) for n in (2048, 8192)]
    assert transfer.choose(dense(4, 4096), causal, DEFAULT, always) is None
    far = [evidence(dense(1, 512), DEFAULT=1.0, BIG=0.5), evidence(dense(1, 1024), DEFAULT=1.0, BIG=0.5)]
    assert transfer.choose(dense(64, 32768), far, DEFAULT, always) is None           # too far to say anything


def test_keep_can_veto_a_transfer():
    near = [evidence(dense(4, n), DEFAULT=1.0, BIG=0.5, SMALL=0.8) for n in (2048, 8192)]
    assert transfer.choose(dense(4, 4096), near, DEFAULT, lambda c: c != BIG).config == SMALL


def test_neighbours_count_programs_not_batch_alone():
    # B4 x H16 and B2 x H32 launch the same number of (batch, head) programs: they are neighbours at distance 0.
    assert transfer.distance(dense(4, 4096), dense(2, 4096, Hq=32, Hkv=32)) == 0
    assert transfer.distance(dense(4, 4096), dense(4, 4096, Hq=16, Hkv=4)) == 2       # GQA group 1 -> 4
    assert transfer.distance(dense(4, 4096), dense(4, 4096, dtype="float16")) == math.inf


times = st.floats(0.1, 10.0, allow_nan=False)


@given(st.lists(st.tuples(st.sampled_from([256, 512, 1024, 2048, 8192, 16384]), st.sampled_from([1, 2, 8, 16]),
                          times, times, times), min_size=0, max_size=6),
       st.sampled_from([1024, 4096]), st.sampled_from([1, 4]))
def test_whatever_is_transferred_beat_default_in_every_neighbour(buckets, n, b):
    unique = {(nn, bb): (d, x, y) for nn, bb, d, x, y in buckets}           # one Evidence per tuned bucket
    ev = [evidence(dense(bb, nn), DEFAULT=d, BIG=x, SMALL=y) for (nn, bb), (d, x, y) in unique.items()]
    problem = dense(b, n)
    choice = transfer.choose(problem, ev, DEFAULT, always)
    near = transfer.neighbours(problem, ev, DEFAULT)
    if choice is None:
        return
    assert len(near) >= transfer.MIN_NEIGHBOURS and choice.neighbours == tuple(e.bucket for e in near)
    key, dkey = config_key(choice.config), config_key(DEFAULT)
    for e in near:
        assert e.ms[dkey] / e.ms[key] >= transfer.MARGIN

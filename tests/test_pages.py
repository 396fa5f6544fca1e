"""The KV page-size recommendation: predicted decode time per page size, weighed with the waste of last blocks, the
table `tunebench pages` prints, and the allocator reading its pick."""
import pytest

from tunebench import cli
from tunebench.runtime import record
from tunebench.runtime.allocator import BlockAllocator
from tunebench.runtime.pages import recommend
from tunebench.runtime.winners import Winners
from tunebench.shapes import Problem
from test_dispatch import _device, db  # noqa: F401  (db: a user database the dispatcher reads)

CONFIG = {"BLOCK_N": 32, "PARTITION": 512, "num_warps": 4, "num_stages": 3, "RESTAGE_V": 0}
SHAPES = ((64, 4096), (16, 16384))


def decode(b, ctx, page=16, hkv=8):
    return Problem("paged_attention", b, 32, hkv, 1, ctx, 128, "bfloat16", page=page)


def tuned(times: dict) -> Winners:
    """Winners at each page: {page: ms of every SHAPES bucket}."""
    return Winners("gpu", [(decode(b, n, page), CONFIG, "test", ms) for page, ms in times.items() for b, n in SHAPES])


def test_a_clearly_faster_page_wins_and_a_marginal_one_loses_to_its_waste():
    report = recommend(tuned({16: 1.0, 128: 0.9}), 8, 128, "bfloat16")
    assert report.pick == 128 and [r.page for r in report.rows] == [16, 128]
    r16, r128 = report.rows
    assert r16.time_ms == pytest.approx(2.0) and r128.time_ms == pytest.approx(1.8) and r16.exact == 2
    # (page - 1) / 2 empty slots per sequence: 64 x 63.5 + 16 x 63.5 over the slots held
    assert r128.waste_pct == pytest.approx(100 * 80 * 63.5 / (64 * 4159.5 + 16 * 16447.5))
    assert r16.waste_pct < r128.waste_pct < 1.0 and r16.blocks == 8 * r128.blocks == (1 << 20) // 16
    assert recommend(tuned({16: 1.0, 128: 0.995}), 8, 128, "bfloat16").pick == 16   # 0.5% faster, ~0.9% more waste


def test_untuned_shapes_take_the_nearest_buckets_bandwidth_and_other_geometries_are_ignored():
    w = tuned({16: 1.0, 32: 1.0})
    workload = [(decode(64, 8192), 3)]                 # twice the bytes of B64 x 4k: twice its time, 3 calls
    report = recommend(w, 8, 128, "bfloat16", workload)
    assert [(r.exact, r.time_ms) for r in report.rows] == [(0, pytest.approx(6.0))] * 2 and report.pick == 16
    assert recommend(w, 4, 128, "bfloat16").pick is None and "nothing to recommend" in recommend(
        w, 4, 128, "bfloat16").table()
    assert "<- pick" in report.table()


def test_the_allocator_and_the_command_read_the_pick_from_the_stored_winners(db, tmp_path, capsys):
    from tunebench.registry import kernel_identity
    for page, ms in ((16, 1.0), (64, 0.5)):
        for b, n in SHAPES:
            db.upsert_winner(_device(), "paged_attention", kernel_identity("paged_attention"), decode(b, n, page),
                             CONFIG, ms, 1.0)
    a = BlockAllocator(8, kv_heads=8, head_dim=128, dtype="bfloat16")
    assert (a.block_size, a.block_size_source) == (64, "tuned")
    assert BlockAllocator(8, kv_heads=2, head_dim=128, dtype="bfloat16").block_size_source == "default"
    path = tmp_path / "shapes.json"
    with record.record(path) as rec:
        rec.count(("a",), lambda: decode(64, 4096))
    assert cli.main(["pages", "--from-record", str(path), "--device", _device().name]) == 0
    out = capsys.readouterr().out
    assert "recommended page size: 64" in out and out.count("\n   16") == 1 and "<- pick" in out
    assert cli.main(["pages", "--preset", "llama-3-8b", "--from-record", str(path)]) == 2

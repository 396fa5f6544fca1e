"""The one formatter per kind of thing (tunebench/text.py) and the tune progress that prints through it."""
import io
import json
import math
from datetime import timedelta

import pytest

from tunebench import text
from tunebench.shapes import suite
from tunebench.store import STATUSES
from tunebench.tune.confirm import ProblemResult
from tunebench.tune.progress import Progress, summary, summary_record
from tunebench.tune.protocol import Outcome


def test_table_pads_columns_rules_the_header_and_right_aligns_numbers():
    out = text.table(["name", "ms"], [["a", "1.5"], ["long name", "12.25"]], right=(1,), indent="  ")
    assert out.splitlines() == ["  name          ms", "  ---------  -----", "  a            1.5", "  long name  12.25"]
    md = text.table(["name", "ms"], [["a", 1.5]], right=(1,), markdown=True)
    assert md.splitlines() == ["| name | ms |", "|---|---:|", "| a | 1.5 |"]


def test_formatters():
    assert text.format_config({"BLOCK_M": 64, "USE_TMA": False}) == "BLOCK_M=64 USE_TMA=False"
    assert text.format_config(None) == "-"
    assert text.format_counts({s: 1 for s in reversed(STATUSES)}) == ", ".join(f"{s} 1" for s in STATUSES)
    assert text.format_counts({"ok": 0}) == "no trials"
    assert [text.format_duration(x) for x in (None, 59, timedelta(minutes=10))] == ["-", "59 s", "10.0 min"]
    assert (text.format_speedup(None), text.format_speedup(1.234)) == ("-", "1.23x")
    assert [text.format_number(x, ".1f") for x in (None, math.nan, 2.25)] == ["-", "-", "2.2"]


def test_json_has_no_nan_and_says_what_made_it(capsys):
    text.print_json("show", {"x": math.inf, "d": timedelta(seconds=3), "nested": [{"y": math.nan}], "s": {1}})
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"tunebench": doc["tunebench"], "command": "show", "x": None, "d": 3.0, "nested": [{"y": None}],
                   "s": [1]}


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _results():
    a, b = suite("tiny")[:2]
    return [ProblemResult(a, {"BLOCK_M": 16}, 0.5, 1.0, 2.0, {"ok": 3, "incorrect": 1}, 1.5, True),
            ProblemResult(b, note="no config passed", counts={"crashed": 2})]


def test_progress_draws_a_bar_on_a_terminal_and_lines_in_a_log():
    result = _results()[0]
    for stream in (_Terminal(), io.StringIO()):
        p = Progress(stream, 0, 2, result.problem)
        p.begin(4, 0, {})
        p.trial(0, {"BLOCK_M": 16}, Outcome("ok", median_ms=0.5), 1, {"ok": 1}, 0.5)
        p.trial(1, {"BLOCK_M": 32}, Outcome("incorrect", message="err 3 > 1"), 2, {"ok": 1, "incorrect": 1}, 0.5)
        p.end(result)
        out = stream.getvalue()
        assert f"[1/2] {result.problem.label()}: 4 trials" in out and "BLOCK_M=16 0.5000 ms" in out
        if isinstance(stream, _Terminal):
            assert "2/4" in out and "ok 1, incorrect 1, best 0.5000 ms" in out and "#1" not in out    # the bar
        else:
            assert "  #1 incorrect BLOCK_M=32 (err 3 > 1)" in out and "\r" not in out


def test_the_tune_summary_as_a_table_and_as_a_record():
    results = _results()
    table = summary(results, 3.0, interpret=True)
    assert "BLOCK_M=16" in table and "2.00x" in table and "ok 3, incorrect 1" in table and "crashed 2" in table
    assert "no config passed" in table and "not a speed measurement" in table
    record = summary_record(results, 3.0, interpret=True)
    assert record["missing"] == 1 and record["problems"][1]["counts"] == {"crashed": 2}
    assert json.loads(json.dumps(record))["problems"][0]["bucket"] == results[0].problem.label()


def test_the_speedup_plot_gives_each_device_its_own_legend_colour(tmp_path, monkeypatch):
    import dataclasses
    from datetime import datetime, timezone
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from tunebench.report import WinnerLine, plot_speedups
    from tunebench.store import Winner
    problem = suite("tiny")[0]
    w = Winner("H100", "9.0", problem.kernel, "h", problem, {}, 1.0, 1.2, None, "", "", datetime.now(timezone.utc))
    lines = [WinnerLine(w, {}, None, None, False), WinnerLine(dataclasses.replace(w, device="H200"), {}, None, None,
                                                                False)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert plot_speedups(lines, tmp_path / "s.png").stat().st_size > 0
    legend = figures[0].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["H100", "H200"]
    colours = [tuple(h.get_facecolor()) for h in legend.legend_handles]
    assert len(set(colours)) == 2

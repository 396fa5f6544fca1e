"""The CLI as people and CI use it: --version, exit codes in --help and in fact, --json on show/report/tune/check
(parsed back), JUnit XML from check (validated against the JUnit structure), and a clear error without Hypothesis."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from importlib.metadata import version

import pytest

from tunebench import cli, commands, gate
from tunebench.correctness import Verdict
from tunebench.device import DeviceIdentity
from tunebench.registry import kernel_module
from tunebench.shapes import Problem, bucket, suite
from tunebench.store import Store, TrialResult

H100 = DeviceIdentity("NVIDIA H100 80GB HBM3", "9.0", 132, 85_000_000_000, "550.54.15", "2.13.0", "3.6.0", True)
TINY_V2 = next(p for p in suite("tiny") if p.kernel == "flash_v2")
COMMANDS = ("check", "tune", "show", "kv-size", "roofline", "bench", "report")


def run_json(capsys, argv: list[str], code: int = 0) -> dict:
    assert cli.main(argv) == code
    doc = json.loads(capsys.readouterr().out)           # the whole of stdout is one JSON document
    assert doc["tunebench"] == version("tunebench") and doc["command"] == argv[0]
    return doc


def test_version_names_tunebench_torch_and_triton_without_importing_them(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"tunebench {version('tunebench')} (torch {version('torch')}, triton {version('triton')}")
    code = ("import sys; from tunebench import cli\ntry: cli.main(['--version'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'optuna', 'hypothesis')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [[]] + [[c] for c in COMMANDS])
def test_every_help_documents_the_exit_codes(argv):
    parser = cli.build_parser()
    text = (parser._subparsers._group_actions[0].choices[argv[0]] if argv else parser).format_help()
    assert commands.EXIT_CODES_HELP in text
    assert [commands.OK, commands.FAILED, commands.USAGE, commands.INTERNAL] == [0, 1, 2, 3]


def test_exit_codes_for_bad_usage_bad_input_and_a_crash(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["check", "--profile", "tpu"])                       # argparse
    assert exit_.value.code == commands.USAGE
    assert cli.main(["check", "--kernel", "flash_v9"]) == commands.USAGE   # the registry (a user's kernel may be named)
    assert "unknown kernel 'flash_v9'" in capsys.readouterr().err
    assert cli.main(["check", "--examples", "0"]) == commands.USAGE
    assert "--examples must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["check", "--kernel", "flash_v2", "--shape", "{}", "--config", "{}"]) == commands.USAGE
    import tunebench.commands.show as show

    def crash(args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(show, "show_command", crash)
    assert cli.main(["show"]) == commands.INTERNAL
    err = capsys.readouterr().err
    assert "ZeroDivisionError: a bug" in err and "internal error" in err


def test_a_config_keep_rejects_is_bad_input_on_replay(capsys):
    shape = dict({k: v for k, v in TINY_V2.__dict__.items() if k != "kernel"}, dtype="float32")
    config = dict(kernel_module("flash_v2").DEFAULT, USE_TMA=True)    # keep(): no TMA for fp32 (nor on a CPU)
    assert cli.main(["check", "--kernel", "flash_v2", "--shape", json.dumps(shape),
                     "--config", json.dumps(config)]) == commands.USAGE
    assert "not admitted by keep()" in capsys.readouterr().err


def test_check_without_hypothesis_names_the_package_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hypothesis", None)       # `import hypothesis` now raises ImportError
    assert cli.main(["check", "--kernel", "flash_v2", "--examples", "1"]) == commands.USAGE
    err = capsys.readouterr().err
    assert "pip install 'hypothesis>=6.100'" in err and "Traceback" not in err


def _fill(db) -> None:
    problem = bucket(TINY_V2)
    config = dict(kernel_module("flash_v2").DEFAULT)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with Store(str(db)) as store:
        for i, ms in enumerate((0.5, 0.25)):
            store.record_trial(H100, "flash_v2", "h", problem, TrialResult(
                i, dict(config, BLOCK_N=16 * (i + 1)), "ok", median_ms=ms, started_at=t0, finished_at=t0))
        store.record_trial(H100, "flash_v2", "h", problem, TrialResult(2, config, "timeout"))
        store.upsert_winner(H100, "flash_v2", "h", problem, dict(config, BLOCK_N=32), 0.25, 2.0)


def test_show_json(tmp_path, capsys):
    db = tmp_path / "results.db"
    _fill(db)
    doc = run_json(capsys, ["show", "--db", str(db), "--json"])
    [w] = doc["winners"]
    assert doc["db"] == str(db)
    assert (w["device"], w["kernel"], w["median_ms"], w["speedup_vs_default"]) == (H100.name, "flash_v2", 0.25, 2.0)
    assert w["bucket"] == bucket(TINY_V2).label() and Problem(**w["problem"]) == bucket(TINY_V2)
    assert w["config"]["BLOCK_N"] == 32 and w["speedup_vs_peer"] is None and w["speed_measurement"]
    assert run_json(capsys, ["show", "--db", str(db), "--json", "--kernel", "flash_v1"])["winners"] == []


def test_report_json(tmp_path, capsys):
    db = tmp_path / "results.db"
    _fill(db)
    doc = run_json(capsys, ["report", "--db", str(db), "--json"])
    [w] = doc["winners"]
    assert doc["trial_totals"] == {"ok": 2, "timeout": 1}
    assert w["trials"] == {"ok": 2, "timeout": 1} and w["stale"] is True       # "h" is not flash_v2's identity
    assert w["vs_runner_up"] == pytest.approx(2.0) and w["tuning_span_s"] == 0.0
    assert w["kernel"] == "flash_v2" and w["config"]["BLOCK_N"] == 32


def test_report_out_without_matplotlib_names_the_plots_extra(tmp_path, monkeypatch, capsys):
    db = tmp_path / "results.db"
    _fill(db)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(["report", "--db", str(db), "--out", str(tmp_path / "out")]) == 0
    assert "pip install 'tunebench[plots]'" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.md").exists()


def test_tune_json_is_the_summary_and_missing_winners_fail(monkeypatch, capsys):
    import tunebench.commands.tune as tune_command
    from tunebench.tune.confirm import ProblemResult
    problems = suite("tiny")[:2]

    def fake_tune(selected, options, results):
        results += [ProblemResult(problems[0], {"BLOCK_M": 16}, 0.5, 1.0, 2.0, {"ok": 3}, 1.5, True),
                    ProblemResult(problems[1], note="no config passed")]
    monkeypatch.setattr(tune_command, "tune", fake_tune)
    doc = run_json(capsys, ["tune", "--interpret", "--suite", "tiny", "--json"], code=commands.FAILED)
    first, second = doc["problems"]
    assert doc["interpret"] is True and doc["missing"] == 1
    assert Problem(**first["problem"]) == problems[0] and first["bucket"] == problems[0].label()
    assert (first["config"], first["speedup"], first["counts"]) == ({"BLOCK_M": 16}, 2.0, {"ok": 3})
    assert second["config"] is None and second["note"] == "no config passed"


def test_tune_dtype_tunes_only_those_dtypes(monkeypatch, capsys):
    import tunebench.commands.tune as tune_command
    seen = []
    monkeypatch.setattr(tune_command, "tune", lambda selected, options, results: seen.extend(selected))
    cli.main(["tune", "--interpret", "--suite", "tiny", "--dtype", "float32"])
    assert seen and {p.dtype for p in seen} == {"float32"}
    assert len(seen) == sum(p.dtype == "float32" for p in suite("tiny"))


def _failing_odd_seeds(problem, config, device, seed=0, layout="bhnd"):
    """A stand-in check with no launch: odd seeds fail (flash_v1's launch crashes, flash_v2's output is wrong)."""
    if seed % 2 and problem.kernel == "flash_v1":
        raise RuntimeError("launch crashed")
    return Verdict(seed % 2 == 0, 0.001, 0.01, "" if seed % 2 == 0 else "err 0.5 > allowed 0.01")


def test_check_json_and_junit_with_failing_cases(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gate, "check_case", _failing_odd_seeds)
    monkeypatch.setenv("TUNEBENCH_PROFILE", "cpu")              # check --profile sets it; restored after the test
    junit = tmp_path / "reports" / "check.xml"
    doc = run_json(capsys, ["check", "--kernel", "flash_v2", "--kernel", "flash_v1", "--profile", "cpu",
                            "--examples", "6", "--json", "--junit", str(junit)], code=commands.FAILED)
    assert doc["ok"] is False and doc["profile"] == "cpu"
    assert [k["kernel"] for k in doc["kernels"]] == ["flash_v2", "flash_v1"]
    for k in doc["kernels"]:
        assert not k["ok"] and k["examples"] >= 2 and k["failures"]
        assert all(f["repro"].startswith(f"tunebench check --kernel {k['kernel']} --shape ") for f in k["failures"])
    assert {f["reason"] for f in doc["kernels"][0]["failures"]} == {"err 0.5 > allowed 0.01"}
    assert {f["reason"] for f in doc["kernels"][1]["failures"]} == {"RuntimeError: launch crashed"}
    check_junit(junit, doc)


def check_junit(path, doc: dict) -> None:
    """The JUnit structure: testsuites > testsuite > testcase (> failure), with counts that add up."""
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [f"tunebench.check.{k['kernel']}" for k in doc["kernels"]]
    for suite_, k in zip(suites, doc["kernels"]):
        cases = suite_.findall("testcase")
        failing = [c for c in cases if c.find("failure") is not None]
        assert int(suite_.get("tests")) == len(cases) == k["examples"]
        assert int(suite_.get("failures")) == len(failing) == len(k["failures"]) and int(suite_.get("errors")) == 0
        assert float(suite_.get("time")) >= 0 and suite_.find("properties/property[@name='device']") is not None
        for c in cases:
            assert c.get("classname") == suite_.get("name") and c.get("name") and float(c.get("time")) >= 0
        for c in failing:
            failure = c.find("failure")
            assert failure.get("message") in failure.text and "reproduce: tunebench check --kernel" in failure.text
    for attr in ("tests", "failures", "errors"):
        assert int(root.get(attr)) == sum(int(s.get(attr)) for s in suites)


def test_check_text_output_passes_with_exit_code_0(monkeypatch, capsys):
    monkeypatch.setattr(gate, "check_case", lambda p, c, d, seed=0, layout="bhnd": Verdict(True, 0.001, 0.01))
    monkeypatch.setenv("TUNEBENCH_PROFILE", "cpu")
    assert cli.main(["check", "--kernel", "flash_v1", "--profile", "cpu", "--examples", "3"]) == commands.OK
    out = capsys.readouterr().out
    assert "profile=cpu" in out and "flash_v1" in out and "FAIL" not in out


def test_the_readme_says_how_to_reach_the_command_and_what_ci_copies():
    import pathlib
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert readme.split("```bash\n", 1)[1].startswith("bash ci/tune.sh ") and "\nbash ci/test.sh " in readme
    assert "source .venv/bin/activate" in readme
    assert "tunebench check --profile cpu --junit check.xml" in readme and "runs-on:" in readme
    assert "tunebench check --profile cpu --junit check.xml" in cli.build_parser()._subparsers._group_actions[
        0].choices["check"].format_help()

import math

import pytest

from tunebench.cli import main
from tunebench.roofline import (DATASHEET, GPUS, MEASURED, SEED_SWEEP, analyze, fused_intensity, gpu_key_for,
                                unfused_score_intensity)
from tunebench.shapes import Problem

# The seed's table (attention-and-kv-cache.md): N, d, ops/byte, and its verdict against the A100's 201.
SEED_TABLE = {(256, 64): 43, (2048, 64): 60, (4096, 64): 62, (256, 128): 64, (2048, 128): 114, (4096, 128): 120,
              (256, 256): 85, (2048, 256): 205, (4096, 256): 228}


def test_unfused_score_intensity_reproduces_the_seed_table_and_its_verdicts():
    ridge = analyze(Problem("flash_v2", 1, 1, 1, 1, 1, 64), "A100", DATASHEET).ridge
    assert round(ridge) == 201
    assert set(SEED_SWEEP) == set(SEED_TABLE)
    for (n, d), seed in SEED_TABLE.items():
        got = unfused_score_intensity(n, d)
        assert round(got) == seed, (n, d, got)
        assert (got > ridge) == (n >= 2048 and d == 256)


def test_fused_attention_intensity_grows_with_n_and_is_compute_bound_at_4k():
    assert fused_intensity(4096, 128) == pytest.approx(2048)        # 4 N^2 d / (4 N d * 2 bytes) = N / 2
    assert fused_intensity(4096, 128, causal=True) == pytest.approx(1024)
    assert fused_intensity(4096, 128, "float32") == pytest.approx(1024)
    a = analyze(Problem("flash_v2", 4, 16, 16, 4096, 4096, 128, "float16"), "H100")
    assert a.bound == "compute" and a.floor_s == a.compute_s > a.memory_s
    assert a.flops == 4 * 4 * 16 * 4096 ** 2 * 128 and a.min_bytes == 4 * 4 * 16 * 4096 * 128 * 2


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_decode_is_memory_bound_everywhere(gpu):
    p = Problem("paged_attention", 64, 32, 8, 1, 4096, 128, "bfloat16")
    a = analyze(p, gpu)
    assert a.bound == "memory" and a.floor_s == a.memory_s > a.compute_s
    assert a.intensity == pytest.approx(p.group, rel=0.01)          # 4 FLOPs per K/V element of 2 bytes, x group
    assert p.kv_bytes == 2 * 64 * 8 * 4096 * 128 * 2 < p.min_bytes


def test_ceilings_say_where_they_come_from():
    for key, g in GPUS.items():
        for options in [g.bandwidth] + list(g.compute.values()):
            assert options and all(c.source in (MEASURED, DATASHEET) and c.value > 0 for c in options), key
        assert set(g.compute) == {"float16", "bfloat16", "float32"}
    h100, h200 = GPUS["H100"], GPUS["H200"]
    assert h100.ceiling("bandwidth").value == pytest.approx(3.0e12)
    assert h100.ceiling("bandwidth", prefer=DATASHEET).value == pytest.approx(3.35e12)
    assert h200.ceiling("bandwidth").value == pytest.approx(4.27e12)
    assert h200.ceiling("bandwidth", prefer=DATASHEET).value == pytest.approx(4.8e12)
    assert h100.ceiling("compute", "bfloat16", DATASHEET).value == h200.ceiling("compute", "bfloat16", DATASHEET).value
    assert GPUS["A100"].ceiling("compute", "float16").value == pytest.approx(312e12)
    # No measurement for the A100 here: asking for one falls back to the datasheet.
    assert GPUS["A100"].ceiling("bandwidth", prefer=MEASURED).source == DATASHEET


@pytest.mark.parametrize("name,key", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100-PCIe"),
                                      ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
                                      ("NVIDIA A100-SXM4-40GB", "A100"), ("Tesla T4", None)])
def test_device_names_map_to_listed_gpus(name, key):
    assert gpu_key_for(name) == key


def test_unknown_gpu_is_refused_by_name():
    with pytest.raises(KeyError, match="unknown GPU 'B200'"):
        analyze(Problem("flash_v2", 1, 1, 1, 64, 64, 64), "B200")


def test_cli_prints_the_analysis(capsys):
    assert main(["roofline", "--batch", "4", "--heads", "16", "--seq-q", "4096", "--head-dim", "128",
                 "--dtype", "bf16", "--gpu", "H200"]) == 0
    out = capsys.readouterr().out
    assert "flash_v2 bfloat16 B4 H16/16 Nq4096 Nk4096 D128" in out
    assert "2048.0 FLOPs/byte" in out and "compute-bound" in out and "H200" in out


def test_cli_paged_needs_a_context_and_reports_memory_bound(capsys):
    argv = ["roofline", "--kernel", "paged_attention", "--batch", "16", "--heads", "32", "--kv-heads", "8",
            "--head-dim", "128", "--gpu", "H100"]
    assert main(argv) == 2
    assert "--seq-k" in capsys.readouterr().err
    assert main(argv + ["--seq-k", "16384"]) == 0
    out = capsys.readouterr().out
    assert "memory-bound" in out and "GB/s" in out


def test_cli_sweep_prints_the_seed_numbers(capsys):
    assert main(["roofline", "--sweep", "--gpu", "A100"]) == 0
    out = capsys.readouterr().out
    assert "ridge point 201" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:2] == ["4096", "128"]]
    assert rows and rows[0][2:4] == ["120", "memory"] and rows[0][4:6] == ["2048", "compute"]


def test_cli_errors_are_clear(capsys):
    assert main(["roofline", "--gpu", "H100"]) == 2
    assert "give --heads, --seq-q, --head-dim" in capsys.readouterr().err
    assert main(["roofline", "--heads", "6", "--kv-heads", "4", "--seq-q", "64", "--head-dim", "64"]) == 2
    assert "multiple of Hkv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["roofline", "--sweep", "--gpu", "B200"])


def test_cli_suite_table(capsys):
    assert main(["roofline", "--suite", "headline", "--gpu", "H100"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("flash", "paged"))]
    assert lines and all(("memory" in line) == line.startswith("paged") for line in lines if "causal" not in line)
    assert not math.isnan(float(lines[0].split()[-1]))

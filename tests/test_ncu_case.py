"""bench/ncu_case.py, the program Nsight Compute wraps (bash bench/gpu_run.sh ncu): its arguments, and that without
a GPU it says so instead of profiling nothing."""
import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "ncu_case.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_an_fp8_cache_is_refused_for_prefill():
    done = run("prefill", "--kv-dtype", "float8_e4m3fn")
    assert done.returncode == 2 and "--kv-dtype is for decode" in done.stderr


def test_an_unknown_variant_is_refused():
    done = run("prefill", "--variant", "v9")
    assert done.returncode == 2 and "invalid choice: 'v9'" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the call")
def test_without_a_gpu_it_says_so():
    done = run("decode", "-B", "2", "-N", "64")
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr


def test_a_config_is_for_a_forced_prefill_kernel_only():
    done = run("prefill", "--config", '{"BLOCK_M": 64}')
    assert done.returncode == 2 and "--config is for prefill with --variant v2 or v3" in done.stderr
    done = run("decode", "--variant", "v3", "--config", '{"BLOCK_M": 64}')
    assert done.returncode == 2 and "--config is for prefill" in done.stderr
    done = run("prefill", "--variant", "v3", "--config", "{BLOCK_M: 64")
    assert done.returncode == 2 and "argument --config: not JSON" in done.stderr
    done = run("prefill", "--variant", "v3", "--config", "[64]")
    assert done.returncode == 2 and "must be a JSON object" in done.stderr

"""bench/paged_sass.py: paged decode compiled for sm_90 on a CPU (Triton's own ptxas), its hot loop counted. Run as a
subprocess without TRITON_INTERPRET (which the CPU gate sets): the script compiles real sm_90 code."""
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "paged_sass.py"


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_the_hot_loop_is_found_and_counted_per_token():
    done = run("--kv", "bf16", "--kv", "fp8e4nv", "--block-n", "64", "--stages", "1")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    per_token = {row[0]: float(row[7]) for row in rows}     # kv BLOCK_N stages warps regs spill loop per-token
    assert set(per_token) == {"bf16", "fp8e4nv"}
    # A 64-token step holds two dots of 32 HMMA each at least, plus the loads: far more than nothing per token.
    assert all(4 < n < 200 for n in per_token.values()), per_token
    # What the 2026-12-07 note explains: an fp8 token costs more instructions than a bf16 token (its tile is widened
    # after a byte-wise read back from shared memory), though it brings half the bytes.
    assert per_token["fp8e4nv"] > per_token["bf16"], per_token
    assert all(int(row[4]) > 0 for row in rows)                  # registers, read from the cubin


def test_a_parameter_the_kernel_lacks_is_refused():
    done = run("--kv", "bf16", "--block-n", "64", "--stages", "1", "--set", "NOT_A_KEY=0")
    assert done.returncode != 0 and "has no parameter 'NOT_A_KEY'" in done.stderr


def test_a_16_bit_cache_of_another_dtype_than_q_is_refused():
    done = run("--q", "bf16", "--kv", "fp16", "--block-n", "64", "--stages", "1")
    assert done.returncode == 2 and "a 16-bit cache has the queries' dtype" in done.stderr

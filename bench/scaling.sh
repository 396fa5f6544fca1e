#!/usr/bin/env bash
# Scaling of `tunebench tune --workers` on one host with 2 GPUs: the same problems, trial budget and seed, tuned once
# with one worker (GPU 0) and once with two (GPUs 0 and 1), each into a fresh results database and a fresh Triton
# cache (so neither run compiles less because the other ran first). Prints:
#   - the wall time of each run and their ratio (the goal: >= 1.8x, i.e. >= 90% scaling efficiency);
#   - GPU utilisation sampled by nvidia-smi every 0.5 s during each run (both GPUs busy in the 2-worker run);
#   - trials per GPU in the 2-worker run (Optuna's `runner` attribute of each trial) and their distinct configs;
#   - where each run's time went (its $TUNEBENCH_TRACE timeline, summarised by bench/trace_summary.py);
#   - the winner of each problem in both runs; where they differ, the two configs re-timed head to head on GPU 0
#     (interleaved rounds, as the tuner confirms winners), so "match within timing noise" is measured, not assumed.
#
# Usage (GPU host, package installed):  bash bench/scaling.sh
# SAMPLER=grid by default: its configs are a queue (DEFAULT, then SPACE shuffled by SEED), so both runs evaluate the
# same TRIALS configs per problem and differ only in how many GPUs do it; TPE would propose differently with two
# runners in flight, and the runs would not be the same work.
# Settings (environment): PRESET (llama-3-8b), KERNEL (flash_v2), SUITE (instead of PRESET: e.g. default, every
#   kernel unless KERNEL is given), TRIALS (16 per problem), SEED (0), SAMPLER (grid),
#   OUT (/tmp/scaling: logs, databases, utilisation samples), NOISE (0.03: winners within 3% count as matching),
#   INTERPRET=1 runs the same comparison on a CPU under the Triton interpreter (a check of this script, not a
#   measurement: tiny suite, flash_v1, no nvidia-smi).
# Sized to take a few minutes on an H200 pair (3 problems x 16 trials per run); shrink TRIALS if it must be shorter.
set -uo pipefail
OUT=${OUT:-/tmp/scaling}
SEED=${SEED:-0}
SAMPLER=${SAMPLER:-grid}
NOISE=${NOISE:-0.03}
INTERPRET=${INTERPRET:-0}
if [ "$INTERPRET" = 1 ]; then
  PROBLEMS=(--suite tiny --kernel "${KERNEL:-flash_v1}" --interpret)
  TRIALS=${TRIALS:-4}
else
  if [ -n "${SUITE:-}" ]; then
    PROBLEMS=(--suite "$SUITE")
    [ -n "${KERNEL:-}" ] && PROBLEMS+=(--kernel "$KERNEL")
  else
    PROBLEMS=(--preset "${PRESET:-llama-3-8b}" --kernel "${KERNEL:-flash_v2}")
  fi
  TRIALS=${TRIALS:-16}
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$gpus" -lt 2 ]; then
    echo "bench/scaling.sh: needs 2 GPUs, nvidia-smi lists $gpus (INTERPRET=1 checks the script on a CPU)" >&2
    exit 2
  fi
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}
fi
if ! command -v tunebench >/dev/null; then
  echo "bench/scaling.sh: install the package first (pip install -e .)" >&2
  exit 2
fi
mkdir -p "$OUT"

tune_with() {  # $1: number of workers
  local dir="$OUT/workers$1" rc smi=""
  rm -rf "$dir"
  mkdir -p "$dir/triton-cache"
  if [ "$INTERPRET" != 1 ]; then
    nvidia-smi --query-gpu=index,utilization.gpu --format=csv,noheader,nounits -lms 500 > "$dir/utilisation.csv" &
    smi=$!
  fi
  echo "=== --workers $1: tunebench tune ${PROBLEMS[*]} --sampler $SAMPLER --trials $TRIALS --seed $SEED" \
       "($(date +%T))"
  local start end
  start=$(date +%s.%N)
  TUNEBENCH_TRACE="$dir/trace.jsonl" TRITON_CACHE_DIR="$dir/triton-cache" tunebench tune "${PROBLEMS[@]}" --sampler "$SAMPLER" --trials "$TRIALS" \
    --seed "$SEED" --workers "$1" --db "$dir/results.db" > "$dir/tune.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  [ -n "$smi" ] && kill "$smi" 2>/dev/null
  python3 -c "print(f'{$end - $start:.1f}')" > "$dir/wall_s"
  grep -v '^  #' "$dir/tune.log" | tail -n 25
  echo "=== --workers $1: exit $rc, $(cat "$dir/wall_s") s; where the time went:"
  python3 "$(dirname "$0")/trace_summary.py" "$dir/trace.jsonl"
  return "$rc"
}

# Read the libraries from disk once before either run, so that the first run does not pay alone for a cold page cache.
python3 -c "import torch, triton, optuna, sqlalchemy, tunebench.tune.run" || exit 1
tune_with 1 || exit 1
tune_with 2 || exit 1

# TRITON_INTERPRET before Python starts: kernels read it when they are imported.
OUT="$OUT" NOISE="$NOISE" INTERPRET="$INTERPRET" SEED="$SEED" TRITON_INTERPRET="$INTERPRET" python3 - <<'PY'
import collections
import csv
import os
import warnings

import optuna

from tunebench import registry
from tunebench.tune import timing
from tunebench.shapes import bucket_key
from tunebench.store import Store
from tunebench.tune.progress import format_config
from tunebench.tune.run import interpreting
from tunebench.tune.worker import retime
from tunebench.inputs import Workload

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.simplefilter("ignore")
out, noise, interpret, seed = os.environ["OUT"], float(os.environ["NOISE"]), os.environ["INTERPRET"] == "1", \
    int(os.environ["SEED"])
runs = {n: f"{out}/workers{n}" for n in (1, 2)}
wall = {n: float(open(f"{d}/wall_s").read()) for n, d in runs.items()}

print(f"\n== wall time: 1 worker {wall[1]:.1f} s, 2 workers {wall[2]:.1f} s: "
      f"{wall[1] / wall[2]:.2f}x faster (efficiency {wall[1] / wall[2] / 2:.0%}; goal >= 1.80x)")

print("\n== GPU utilisation (nvidia-smi, every 0.5 s): mean %, share of samples > 0%")
for n, d in runs.items():
    path = f"{d}/utilisation.csv"
    if not os.path.exists(path):
        print(f"  {n} worker(s): not sampled (no nvidia-smi)")
        continue
    samples = collections.defaultdict(list)
    for row in csv.reader(open(path)):
        if len(row) == 2 and row[1].strip().isdigit():
            samples[row[0].strip()].append(int(row[1]))
    line = ", ".join(f"GPU {gpu}: mean {sum(v) / len(v):.0f}%, busy {sum(x > 0 for x in v) / len(v):.0%}"
                     for gpu, v in sorted(samples.items()))
    print(f"  {n} worker(s): {line}")



def evaluated(run_dir: str) -> list[tuple[str, tuple, str]]:
    """(study, config, runner) of each trial that ran a config to a verdict (not pruned, not a repeat)."""
    storage = f"sqlite:///{run_dir}/results.optuna.db"
    out = []
    for summary in optuna.get_all_study_summaries(storage):
        for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials:
            if t.user_attrs.get("status") not in (None, "pruned") and "duplicate_of" not in t.user_attrs:
                out.append((summary.study_name, tuple(sorted(t.params.items())), t.user_attrs.get("runner", "?")))
    return out


trials = {n: evaluated(d) for n, d in runs.items()}
print("\n== trials per runner, from the Optuna studies")
for n, ts in trials.items():
    per_runner = collections.Counter(runner for _, _, runner in ts)
    configs = collections.Counter((study, config) for study, config, _ in ts)
    print(f"  {n} worker(s): " + ", ".join(f"{runner}: {count}" for runner, count in sorted(per_runner.items()))
          + f"; {len(ts)} evaluated, {sum(c > 1 for c in configs.values())} configs evaluated twice")
same = {(s, c) for s, c, _ in trials[1]} == {(s, c) for s, c, _ in trials[2]}
print(f"  the two runs evaluated {'the same' if same else 'DIFFERENT'} configs")

print("\n== winners")
winners = {}
for n, d in runs.items():
    with Store(f"{d}/results.db", readonly=True) as store:
        winners[n] = {bucket_key(w.problem): w for w in store.winners()}
matched = 0
for key in sorted(set(winners[1]) | set(winners[2])):
    one, two = winners[1].get(key), winners[2].get(key)
    if one is None or two is None:
        print(f"  {key}: only in the {1 if two is None else 2}-worker run")
        continue
    if one.config == two.config:
        matched += 1
        print(f"  {key}: same config {format_config(one.config)} ({one.median_ms:.4f} / {two.median_ms:.4f} ms)")
        continue
    # Different configs: time both on one GPU, interleaved, as the tuner's confirmation does.
    module = registry.kernel_module(one.kernel)
    with interpreting(interpret):
        workload = Workload(one.problem, seed, "cpu" if interpret else "cuda")
        rounds = retime(workload, module, [one.config, two.config], timing.bench_for(interpret), 5)
    ms = [timing.confirmed_ms(r) for r in rounds]
    ratio = ms[1] / ms[0]
    ok = abs(ratio - 1) <= noise
    matched += ok
    print(f"  {key}: 1 worker {format_config(one.config)} {ms[0]:.4f} ms, 2 workers {format_config(two.config)} "
          f"{ms[1]:.4f} ms head to head: {ratio:.3f}x -> {'within' if ok else 'OUTSIDE'} {noise:.0%} noise")
print(f"  {matched} of {len(set(winners[1]) | set(winners[2]))} problems: winners match within timing noise")
PY

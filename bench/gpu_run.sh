#!/usr/bin/env bash
# One device call: install the carried wheels and the package, then run the named steps, logging under $OUT.
# Usage (on the GPU machine, from the repo root):  bash bench/gpu_run.sh STEP [STEP ...]
#   tests   the whole suite with the gpu profile (pytest -n 8: 200 examples per kernel, sharded)
#   gputests only the tests marked gpu, with the gpu profile (the CPU gate runs the rest): the failures named
#           (-rfE) in $OUT/gputests.log as they come, so a call cut short still says which failed, and each failure's
#           message in $OUT/failures.log as it happens (PYTEST_ARGS: other files or -k; TUNEBENCH_PROFILE=gpu-triage:
#           no shrinking; GPUTESTS_S: its own time limit, default 540 s, so that the steps after it still run)
#   tune    tunebench tune on the default suite into $DB (timed; TUNE_ARGS: more options)
#   bench   tunebench bench on the headline suite
#   example examples/generate.py on the GPU (EXAMPLE_ARGS: its options, e.g. --dtype bfloat16 --kv-dtype fp8)
#   paged   tunebench tune --suite pages, then --suite decode (page 16), into $DB; then tunebench pages
#   retune  the paged kernel's headline buckets (its decode shapes on a bf16 and on an e4m3 cache, B 1 x 128k, and
#           B 64 x 4k at every page size) into $DB, PAGED_TRIALS trials each: what a change of the paged kernel's code
#           makes stale first
#   retune-pages  then every page size of the pages suite (the recommendation `tunebench pages` makes)
#   prefilltune  tunebench tune --suite paged-prefill --kernel paged_prefill into $DB, PAGED_TRIALS trials each (the
#           default suite holds no paged_prefill bucket: what a change of the paged prefill kernel's code makes stale)
#   fp8bench bench/fp8_decode.py alone (fp8 against the bf16 cache, B16 x 16k, each on its own bucket's winner),
#           rows in $OUT/fp8-decode.csv and .json
#   fp8     tunebench tune --suite fp8 (the headline's decode shapes on an e4m3 cache) into $DB, PAGED_TRIALS
#           trials each, then bench/fp8_decode.py (fp8 against the bf16 cache, B16 x 16k; each runs its own bucket)
#   loo     bench/transfer_loo.py on $DB: leave-one-out of safe transfer, and the dispatcher vs DEFAULT on the
#           headline suite (LOO_ARGS: more options; --limit 0 times only the dispatcher's choices)
#   overhead bench/dispatch_overhead.py: import time, dispatch and recording cost per call
#   hf      bench/transformers_generate.py: generate tokens/s through attn_implementation="tunebench" vs "sdpa"
#   v3tests tests/test_flash_v3.py with the gpu profile (flash_v3, Gluon sm_90: 200 Hypothesis examples, awkward shapes),
#           verbose straight into $OUT/v3tests.log, so that a step cut short by its limit still says how far it got
#   v3probe bench/flash_v3_probe.py: every flash_v3 config checked, then timed beside flash_v2 DEFAULT and cuDNN
#   hostile tests/test_paged_hostile.py with the gpu profile (issue 16: hostile paged inputs, 200 examples per kernel),
#           verbose straight into $OUT/hostile.log, so that a step cut short by its limit still says how far it got
#   prefillprobe bench/paged_prefill_probe.py (issue 20: a paged prefill chunk against dense SDPA/cuDNN/flash_v2, and
#           a mixed batch as one launch against two, and the two on two streams); rows in $OUT/paged-prefill*.csv
#           and .json
#   checkcost bench/paged_check_cost.py: masked vs unmasked paged decode, and check=True's cost per call, on
#           $DB's winners
#   reducecost bench/decode_reduce_cost.py on $DB's winners: what the split-K reduce costs on the headline decode
#           shapes (each config with and without its split, the two launches alone); rows in
#           $OUT/decode-reduce-cost.csv
#   ncu     Nsight Compute on one launch each (bench/ncu_case.py, the tuned dispatcher on $DB): flash_v3 and flash_v2
#           at bf16 D128 N4k, paged decode at B16 x 16k on a bf16 and an e4m3 cache: speed of light, warp stall
#           reasons, occupancy, into $OUT/ncu.txt (NCU_SECTIONS: other sections; NCU_CASES: other ncu_case.py
#           argument lists, separated by ';'; `prefill --variant cudnn` profiles cuDNN's kernel on the same inputs)
#   corun   bench/mixed_corun.py: issue 20's mixed batch as its two parts on two streams, every pair of a list of
#           chunk and decode configs (each checked first) against the two one after the other; $OUT/mixed-corun.*
#   pack    tars everything under $OUT but results.db and log (the caller's `tee $OUT/log`) into $OUT/outputs.tgz
#           and removes it: the device returns at most 8 files (make it the last step)
#   serve   examples/serve.py (issue 20's goal: 64 requests sharing a 1k-token system prompt, without then with
#           prefix caching; SERVE_ARGS adds options), then tests/test_serve.py with its gpu test
# STEP:SECONDS gives a step its own time limit (e.g. `hostile:160 checkcost:110 tune:230 pack`), so that one call
# runs several steps within the device's per-call limit; the install is done once per machine, not once per call.
# The steps read and tune $DB (default ./results.db). DB=out/run.db (git-ignored) starts as a copy of ./results.db and
# stays on a warm machine between calls, with the Optuna journal beside it, so a tune cut short by one call's limit
# resumes in the next even if the caller's tree carries the shipped results.db again. $DB is copied to
# $OUT/results.db after each step (WAL checkpointed first), so a call cut short keeps what it tuned.
set -uo pipefail
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export DB=${DB:-results.db}
if [ ! -e "$DB" ]; then mkdir -p "$(dirname "$DB")" && cp results.db "$DB" || exit 1; fi
if [ ! -e /tmp/site/.tunebench-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
  touch /tmp/site/.tunebench-installed
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

# A tuning step's output (stdin): progress bars' carriage returns made lines, blank lines dropped, the last 60 kB kept
# in $OUT/$1.log; then its last $2 lines that are not per-trial rows shown. Returns the keeping's status.
keep_log() {
  local r
  tr '\r' '\n' | grep -v '^\s*$' | tail -c 60000 > "$OUT/$1.log"; r=$?
  grep -v '^  #' "$OUT/$1.log" | tail -n "$2"
  return $r
}
export -f keep_log

# A pytest step's output, verbose straight into $OUT/$1.log (so that a step cut short by its limit still says how far
# it got), then its failures and totals shown. Returns pytest's status.
pytest_log() {
  local log="$OUT/$1.log" r; shift
  python3 -P -m pytest -v -n 8 -p no:cacheprovider -rfE --tb=short "$@" > "$log" 2>&1; r=$?
  grep -E '(FAILED|ERROR) |passed|failed' "$log" | tail -n 40
  return $r
}
export -f pytest_log

run_step() {
  # Also under `bash -c` (a step with a time limit), which does not inherit the script's pipefail: a tool that fails
  # inside a pipeline must fail its step.
  set -o pipefail
  local step=$1 r
  case "$step" in
    tests)   python3 -P -m pytest -q -n 8 -p no:cacheprovider ${PYTEST_ARGS:-} tests/ 2>&1 | tail -n 200 > "$OUT/tests.log"; r=$?
             tail -n 40 "$OUT/tests.log" ;;
    gputests) TUNEBENCH_FAILURE_LOG="$OUT/failures.log" timeout "${GPUTESTS_S:-540}" python3 -P -m pytest -v -n 8 -m gpu \
               -p no:cacheprovider -rfE --tb=short ${PYTEST_ARGS:-tests/} > "$OUT/gputests.log" 2>&1
             r=$?; grep -E '(^| )(FAILED|ERROR) ' "$OUT/gputests.log" | sort -u | tail -n 60; tail -n 3 "$OUT/gputests.log"
             [ -s "$OUT/failures.log" ] && head -c 4000 "$OUT/failures.log" ;;
    pack)    tar czf /tmp/outputs.tgz -C "$OUT" --exclude=./results.db --exclude=./log . &&
               find "$OUT" -mindepth 1 ! -name results.db ! -name log -delete && mv /tmp/outputs.tgz "$OUT/outputs.tgz"
             r=$?; ls -la "$OUT" ;;
    tune)    tunebench tune --db "$DB" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" | grep -v '^\s*\[' ; r=$? ;;
    bench)   TUNEBENCH_DB="$DB" tunebench bench --suite ${BENCH_SUITE:-headline} --out "$OUT/bench" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"; r=$? ;;
    example) TUNEBENCH_DB="$DB" python3 examples/generate.py ${EXAMPLE_ARGS:-} 2>&1 | tee "$OUT/example.log"; r=$? ;;
    paged)   { tunebench tune --suite pages --trials ${PAGED_TRIALS:-12} --db "$DB" &&
               tunebench tune --suite decode --trials ${PAGED_TRIALS:-12} --db "$DB" &&
               tunebench pages --preset llama-3-8b --db "$DB"; } 2>&1 | keep_log paged 60; r=$? ;;
    retune)  tunebench tune --suite headline --kernel paged_attention --trials ${PAGED_TRIALS:-12} --db "$DB" \
               2>&1 | keep_log retune 30; r=$? ;;
    prefilltune) tunebench tune --suite paged-prefill --kernel paged_prefill --trials ${PAGED_TRIALS:-12} --db "$DB" \
               2>&1 | keep_log prefilltune 20; r=$? ;;
    retune-pages) tunebench tune --suite pages --trials ${PAGED_TRIALS:-12} --db "$DB" 2>&1 | keep_log pages 30; r=$? ;;
    fp8bench) TUNEBENCH_DB="$DB" python3 bench/fp8_decode.py --out "$OUT" 2>&1 | tee "$OUT/fp8bench.log"
             r=$? ;;
    fp8)     { tunebench tune --suite fp8 --trials ${PAGED_TRIALS:-12} --db "$DB" &&
               TUNEBENCH_DB="$DB" python3 bench/fp8_decode.py --out "$OUT"; } 2>&1 | keep_log fp8 30; r=$? ;;
    loo)     python3 bench/transfer_loo.py --db "$DB" --rounds ${LOO_ROUNDS:-5} --out "$OUT" --dispatch headline ${LOO_ARGS:-} \
               2>&1 | tee "$OUT/loo.log"; r=$? ;;
    overhead) python3 bench/dispatch_overhead.py 2>&1 | tee "$OUT/overhead.log"; r=$? ;;
    hf)      python3 bench/transformers_generate.py --json "$OUT/hf.json" ${HF_ARGS:-} 2>&1 | tee "$OUT/hf.log"; r=$? ;;
    v3tests) pytest_log v3tests -m gpu tests/test_flash_v3.py; r=$? ;;
    v3probe) python3 bench/flash_v3_probe.py --out "$OUT" ${V3_ARGS:-} 2>&1 | tee "$OUT/v3probe.log"; r=$? ;;
    hostile) pytest_log hostile tests/test_paged_hostile.py; r=$? ;;
    prefillprobe) TUNEBENCH_DB="$DB" python3 bench/paged_prefill_probe.py --out "$OUT" 2>&1 \
               | tee "$OUT/prefillprobe.log"; r=$? ;;
    checkcost) TUNEBENCH_DB="$DB" python3 bench/paged_check_cost.py --out "$OUT" ${CHECKCOST_ARGS:-} 2>&1 | tee "$OUT/checkcost.log"
             r=$? ;;
    corun)   python3 bench/mixed_corun.py --out "$OUT" 2>&1 | tee "$OUT/corun.log"; r=$? ;;
    reducecost) TUNEBENCH_DB="$DB" python3 bench/decode_reduce_cost.py --out "$OUT" 2>&1 | tee "$OUT/reducecost.log"
             r=$? ;;
    serve)   { TUNEBENCH_DB="$DB" python3 examples/serve.py --json "$OUT/serve.json" ${SERVE_ARGS:-} &&
               python3 -P -m pytest -q -p no:cacheprovider tests/test_serve.py; } 2>&1 | tee "$OUT/serve.log"; r=$? ;;
    ncu)     r=0; default="prefill --variant v3;prefill --variant v2;decode -B 16 -N 16384"
             default+=";decode -B 16 -N 16384 --kv-dtype float8_e4m3fn"
             IFS=';' read -ra cases <<< "${NCU_CASES:-$default}"
             for case in "${cases[@]}"; do
               echo "### $case" >> "$OUT/ncu.txt"
               TUNEBENCH_DB="$DB" ncu --clock-control none -k regex:'_fwd|_paged_decode|sdpa' -s 3 -c 1 \
                 ${NCU_SECTIONS:---section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats} \
                 python3 bench/ncu_case.py $case >> "$OUT/ncu.txt" 2>&1 || r=$?
             done; grep -E '^###|->|Duration|Throughput|Warp Cycles Per Issued|Achieved Occupancy|Registers Per' "$OUT/ncu.txt" | head -n 80 ;;
    *)       echo "unknown step $step"; r=2 ;;
  esac
  return $r
}
export -f run_step

rc=0
for spec in "$@"; do
  step=${spec%%:*}; limit=${spec#"$step"}; limit=${limit#:}
  echo "=== $step $(date +%T)${limit:+ (limit $limit s)}"
  start=$(date +%s)
  if [ -n "$limit" ]; then timeout "$limit" bash -c 'run_step "$0"' "$step"; else run_step "$step"; fi
  r=$?
  echo "=== $step rc=$r in $(( $(date +%s) - start )) s"
  python3 -c "import sqlite3; sqlite3.connect('$DB').execute('PRAGMA wal_checkpoint(TRUNCATE)')" &&
    cp "$DB" "$OUT/results.db"
  [ "$r" = 0 ] || rc=$r
done
exit $rc

#!/usr/bin/env bash
# What tuning costs on one GPU, the closing checks of "Results store and `tunebench tune`", in one go:
#   full        `tunebench tune` on the default suite (every kernel, default trials), from a fresh results
#               database and a fresh Triton cache, timed end to end as one command;
#   efficiency  bench/search_efficiency.py: grid vs TPE at 25% of the grid, 5 seeds, head-to-head re-timed;
#   compile     compile-ahead's saving: the llama-3-8b flash_v2 prefill problems, TRIALS trials each, tuned with
#               --compile-workers 0 and with the default, each from a fresh Triton cache and results database.
# Usage (GPU machine, package installed):  bash bench/tuning_costs.sh [full] [efficiency] [compile]   (default: all)
# Settings (environment): DIR (/tmp/tuning_costs: logs, databases), TRIALS (16, for compile), EFFICIENCY_ARGS
#   (more arguments for search_efficiency.py, e.g. "--grids .grids" to reuse an earlier run's grids).
# Writes DIR/STEP/... and DIR/summary.txt; DIR/done when every step has ended (for a caller polling a background run).
set -uo pipefail
DIR=${DIR:-/tmp/tuning_costs}
TRIALS=${TRIALS:-16}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(full efficiency compile)
mkdir -p "$DIR"
rm -f "$DIR/done"
summary="$DIR/summary.txt"

timed() {  # $1: name, $2: folder; the rest: the command. Runs it with a fresh Triton cache; logs its wall time.
  local name=$1 dir=$2 start end rc
  shift 2
  rm -rf "$dir" && mkdir -p "$dir/triton-cache"
  echo "=== $name: $* ($(date +%T))" | tee -a "$summary"
  start=$(date +%s.%N)
  TRITON_CACHE_DIR="$dir/triton-cache" "$@" > "$dir/log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  grep -v '^\s*\[\|^  #' "$dir/log" | tail -n 40 >> "$summary"
  python3 -c "print(f'=== $name: exit $rc, wall {$end - $start:.1f} s')" | tee -a "$summary"
  rm -rf "$dir/triton-cache"
}

for step in "${steps[@]}"; do
  case "$step" in
    full)
      timed full "$DIR/full" tunebench tune --db "$DIR/full/results.db" ;;
    efficiency)
      timed efficiency "$DIR/efficiency" python3 bench/search_efficiency.py --out "$DIR/efficiency" ${EFFICIENCY_ARGS:-} ;;
    compile)
      for cw in 0 default; do
        args=(--preset llama-3-8b --kernel flash_v2 --trials "$TRIALS" --db "$DIR/compile-$cw/results.db")
        [ "$cw" = default ] || args+=(--compile-workers "$cw")
        timed "compile-workers $cw" "$DIR/compile-$cw" tunebench tune "${args[@]}"
      done ;;
    *) echo "unknown step $step" | tee -a "$summary" ;;
  esac
done
touch "$DIR/done"

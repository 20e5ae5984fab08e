#!/usr/bin/env bash
# One command for a full validation on a machine with a GPU:
#
#     bash benchmarks/gpu_validate.sh [STAGE ...]      stages: install env tests check aot bench report
#                                                      (default: all of them, in that order)
#
# Everything it produces lands in benchmarks/results/<gpu>-<date>/: the environment, one log per
# stage, the AOT table, the pytest-benchmark JSON, the report (markdown + plots), and status.txt
# with each stage's exit code. Stages can be run in separate calls (the folder is the same all
# day), e.g. `tests check aot` in one and `bench report` in the next; the summary table of the
# benchmark report is printed last. It needs torch and triton on the machine and nothing of ours
# beyond `pip install --no-deps --no-build-isolation -e .` (the `install` stage runs exactly that;
# pytest, pytest-benchmark and matplotlib are expected to be there already).
#
# Knobs: PYTHON (default python3), NORMOPS_BENCH_ARGS (extra pytest arguments for the bench stage,
# e.g. "-k 'row_norm and bfloat16'" to fit a time budget).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null \
      | tr ' /' '--' | tr -cd 'A-Za-z0-9_.-')
out="benchmarks/results/${gpu:-unknown}-$(date -u +%Y-%m-%d)"
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(install env tests check aot bench report)

run_stage() {  # run_stage NAME COMMAND...: log to $out/NAME.log, record the exit code
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '%-8s rc=%-3s %5ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$*" | tee -a "$out/status.txt"
  tail -n 3 "$out/$name.log"
  return 0
}

for stage in "${stages[@]}"; do
  case $stage in
    install) run_stage install $PY -m pip install --no-deps --no-build-isolation -e . ;;
    env) run_stage env bash -c "$PY -c 'import json, normops.bench as b; print(json.dumps(b.environment(\"cuda\"), indent=1)); print(\"copy GB/s\", b.copy_bandwidth(\"cuda\"))'; nvidia-smi; $PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|numpy|pytest|matplotlib|normops) '" ;;
    tests) run_stage tests $PY -m pytest tests -q -p no:cacheprovider ;;
    check) run_stage check $PY -m normops.cli check --device cuda ;;
    aot) run_stage aot $PY -m normops.kernels.aot; cp "$out/aot.log" "$out/aot.txt" ;;
    bench) run_stage bench bash -c "$PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-json=$out/benchmarks.json ${NORMOPS_BENCH_ARGS:-}" ;;
    report) run_stage report $PY benchmarks/report.py "$out/benchmarks.json" --out "$out" ;;
    *) echo "unknown stage: $stage (stages: install env tests check aot bench report)"; exit 2 ;;
  esac
done
echo
echo "results: $out"
cat "$out/status.txt"
if [ -f "$out/report.log" ]; then echo; cat "$out/report.log"; fi  # the benchmark summary, last

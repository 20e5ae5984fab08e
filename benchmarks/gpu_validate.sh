#!/usr/bin/env bash
# One command for a full validation on a machine with a GPU:
#
#     bash benchmarks/gpu_validate.sh [STAGE ...]      stages: install env tests check aot bench report
#                                                      (default: all of them, in that order)
#                                                      and acceptance (not in the default)
#
# On a lease of 15 minutes of device time (the machine's start included), run
#
#     bash benchmarks/gpu_validate.sh install env acceptance
#
# and nothing else first: benchmarks/acceptance.py runs the Triton CUDA tests and `normops check`
# in the background while it warms the kernel caches in parallel, then times only the cases that
# the issues' performance points name, within a budget (about 7 minutes in all; killed at
# NORMOPS_ACCEPTANCE_TIMEOUT, 500 s), and prints a verdict per point last. When $OUT is set (the
# device tool), acceptance.py copies its results there as they grow, and at the end the results
# folder is packed into $OUT/results.tgz. The full stages below take far longer: the bench stage
# alone times 1134 cases, 162 under torch.compile.
#
# Everything it produces lands in benchmarks/results/<gpu>-<date>/: the environment, one log per
# stage, the AOT table, the pytest-benchmark JSON, the report (markdown + plots), and status.txt
# with each stage's exit code. Stages can be run in separate calls (the folder is the same all
# day), e.g. `tests check aot` in one and `bench report` in the next; the summary table of the
# benchmark report is printed last. It needs torch and triton on the machine and nothing of ours
# beyond `pip install --no-deps --no-build-isolation -e .` (the `install` stage runs exactly that;
# pytest, pytest-benchmark and matplotlib are expected to be there already).
#
# Knobs: PYTHON (default python3); NORMOPS_ACCEPTANCE_ARGS (extra arguments of acceptance.py, e.g.
# "--budget 300 --families row_norm"); NORMOPS_TEST_ARGS (extra pytest arguments for the tests stage,
# e.g. "-n 8" where pytest-xdist is installed); for the bench stage NORMOPS_BENCH_FAMILIES (default
# "row_norm group_norm batch_norm", one JSON each), NORMOPS_BENCH_ARGS (extra pytest arguments, e.g.
# "-k 'not compile'") and NORMOPS_BENCH_TAG (a suffix for the JSON names, so filtered runs add files
# instead of overwriting). The report stage reads every bench-*.json of the folder.
# On a lent machine with a per-command time limit: start every call with `install` (the machine may
# be fresh), and copy the folder out at the end of each call (e.g. tar it into the tool's $OUT).
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
    install) run_stage install $PY -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e . ;;
    env) run_stage env timeout -k 5 90 bash -c "$PY -c 'import json, normops.bench as b; print(json.dumps(b.environment(\"cuda\"), indent=1)); print(\"copy GB/s\", b.copy_bandwidth(\"cuda\"))'; nvidia-smi; nvidia-smi -q -d CLOCK,PERFORMANCE,COMPUTE,ECC; $PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|numpy|pytest|matplotlib|normops) '" ;;
    tests) run_stage tests bash -c "$PY -m pytest tests -q -p no:cacheprovider ${NORMOPS_TEST_ARGS:-}" ;;
    check) run_stage check $PY -m normops.cli check --device cuda ;;
    aot) run_stage aot $PY -m normops.kernels.aot; cp "$out/aot.log" "$out/aot.txt" ;;
    bench)  # one JSON per family (and per NORMOPS_BENCH_TAG): a run killed at a time limit loses one file only
      for fam in ${NORMOPS_BENCH_FAMILIES:-row_norm group_norm batch_norm}; do
        json="$out/bench-${fam}${NORMOPS_BENCH_TAG:+-$NORMOPS_BENCH_TAG}.json"
        run_stage "bench-$fam" bash -c "$PY -m pytest benchmarks/bench_${fam}.py -q -p no:cacheprovider --benchmark-json=$json ${NORMOPS_BENCH_ARGS:-}"
      done ;;
    report) run_stage report bash -c "$PY benchmarks/report.py $out/bench-*.json --out $out" ;;
    acceptance)  # a hard stop inside the device tool's 600 s; --mirror keeps $OUT filled as it goes
      run_stage acceptance timeout -k 10 "${NORMOPS_ACCEPTANCE_TIMEOUT:-500}" $PY benchmarks/acceptance.py --out "$out" \
        --tests ${OUT:+--mirror "$OUT"} ${NORMOPS_ACCEPTANCE_ARGS:-} ;;
    *) echo "unknown stage: $stage (stages: install env tests check aot bench report acceptance)"; exit 2 ;;
  esac
done
echo
echo "results: $out"
cat "$out/status.txt"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then  # the device tool brings back what is under $OUT: 8 files at most
  tar czf "$OUT/results.tgz" -C "$(dirname "$out")" "$(basename "$out")"
fi
if [ -f "$out/report.log" ]; then echo; cat "$out/report.log"; fi  # the benchmark summary, last
if [ -f "$out/acceptance.md" ]; then echo; cat "$out/acceptance.md"; fi

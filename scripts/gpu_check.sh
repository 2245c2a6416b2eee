#!/usr/bin/env bash
# The GPU check the lead runs on the GPU machine (from the checkout root):
#
#   scripts/gpu_check.sh [STAGE] [MODEL...]
#
# STAGE: env | tests | trust | memory | compile | fused | probe | bench | quick | sweep | alloc | profile | report | all (default all). bench takes model names (default:
# the paper's six). quick is the mid-course check: bench of googlenet deepfm bert (or the models given) with
# MODES=eager,cudagraph,opara,opara+topological,auto,nimble+topological,wavefront+topological and ITERS=200. Every stage rewrites
# benchmarks/results/$NAME/$NAME.md and .json from what exists so far, so a timeout still leaves a report; with $OUT set
# (the device tool) results are copied there too. Each bench profiles the model before timing any mode (fairness).
# Knobs (environment): ITERS (200), BUDGET_S (wall budget for this call, 540), NAME (h200), MODES, SWEEP_MODES,
# SWEEP_BATCHES, SWEEP_MODEL (inception_v3), CUDA_TEST_TIMEOUT (300), MODEL_TIMEOUT_S (per-model default table).
# To stay under 10 minutes per call, split it, e.g.:
#   scripts/gpu_check.sh tests; scripts/gpu_check.sh bench googlenet inception_v3 deepfm;
#   scripts/gpu_check.sh bench nasnet; scripts/gpu_check.sh bench bert t5; scripts/gpu_check.sh sweep;
#   scripts/gpu_check.sh alloc
# Mid-course check: scripts/gpu_check.sh quick
# Memory against streams (issue 13): MEMORY_MODELS=googlenet,deepfm scripts/gpu_check.sh memory
# Compile time (issue 10): COMPILE_MODEL=googlenet [COMPILE_PROFILE=1] [COMPILE_PYCACHE=/tmp/pyc] scripts/gpu_check.sh compile (benchmarks/compile_time.py: fused
# planning and reduce-overhead, cold and warm, each in a fresh process)
# Fused segments (issue 10): scripts/gpu_check.sh fused (event-cost probe, then the fused cuda tests: FUSED_TESTS is
# their -k expression, default "not nasnet"; FUSED_TESTS=nasnet for that one); scripts/gpu_check.sh probe [MODEL...]
# (benchmarks/fused_probe.py per model: compile time, segments, measured vs modelled costs). Fused bench rows:
# MODES=eager,cudagraph,opara,opara+fused,auto,auto+fused,compile scripts/gpu_check.sh bench googlenet
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

STAGE=${1:-all}
shift || true
ITERS=${ITERS:-200}
BUDGET_S=${BUDGET_S:-540}
NAME=${NAME:-h200}
# most important first: a model that runs out of time still has its baseline and opara rows
MODES=${MODES:-eager,cudagraph,opara,opara+topological,auto,nimble+topological,wavefront+topological,compile}
if [ "$STAGE" = quick ]; then
  # fixed modes and iterations, so that quick checks compare with one another
  MODES=eager,cudagraph,opara,opara+topological,auto,nimble+topological,wavefront+topological
  ITERS=200
fi
SWEEP_MODES=${SWEEP_MODES:-eager,cudagraph,opara,auto}
SWEEP_BATCHES=${SWEEP_BATCHES:-1,2,4,8,16,32}
SWEEP_MODEL=${SWEEP_MODEL:-inception_v3}
RES=benchmarks/results/$NAME
PARTS=$RES/parts
mkdir -p "$PARTS"
MODELS=("$@")
MODELS_GIVEN=${#MODELS[@]}
[ ${#MODELS[@]} -eq 0 ] && MODELS=(googlenet inception_v3 nasnet deepfm bert t5)

# seconds each model may take in the bench stage (capture of NASNet and reduce-overhead compiles are the slow parts)
# (MODEL_TIMEOUT_S, when set, replaces them all)
declare -A MODEL_TIMEOUT=([googlenet]=120 [inception_v3]=150 [nasnet]=300 [deepfm]=90 [bert]=150 [t5]=120)

left() { echo $((BUDGET_S - SECONDS)); }

# run CMD... with a timeout of min($1, budget left - 15 s); logs the exact command
bounded() {
  local want=$1; shift
  local cap=$(( $(left) - 15 ))
  [ "$want" -lt "$cap" ] || want=$cap
  if [ "$want" -lt 20 ]; then
    echo "SKIPPED (wall budget spent): $*" | tee -a "$PARTS/commands.txt"
    return 124
  fi
  echo "timeout $want $*" | tee -a "$PARTS/commands.txt"
  timeout --signal=INT --kill-after=10 "$want" "$@"
}

report() {
  python -m opara_nb.bench.collect "$RES" --name "$NAME" || echo "collect failed"
  if [ -n "${OUT:-}" ]; then
    cp "$RES/$NAME.md" "$RES/$NAME.json" "$OUT/" 2>/dev/null || true
    # the device tool returns at most 8 files: the parts travel as one archive
    tar czf "$OUT/parts.tgz" -C "$RES" parts 2>/dev/null || true
  fi
}

stage_env() {
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "git: ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1
    python -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn", torch.backends.cudnn.allow_tf32)'
    for lib in torchvision timm transformers; do
      python -c "import $lib; print('$lib', $lib.__version__)" 2>/dev/null || echo "$lib: not installed"
    done
    echo "ITERS=$ITERS MODES=$MODES SWEEP_MODES=$SWEEP_MODES SWEEP_BATCHES=$SWEEP_BATCHES"
  } > "$PARTS/env.txt"
  cat "$PARTS/env.txt"
}

# The notebook cuda tests need IPython, which the GPU machine lacks (and it has no network): carry wheels made here,
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --implementation cp \
#     -d .whl ipython ipywidgets nbformat
# with the device tool's carry=[".whl"]; they are installed into a scratch folder, never into the machine's Python.
nb_deps() {
  [ -d .whl ] || { echo "no .whl/: the notebook cuda tests will be skipped (see nb_deps in this script)"; return; }
  pip install --quiet --no-index --find-links .whl --target /tmp/opara_nb_deps ipython ipywidgets nbformat \
    && export PYTHONPATH=$PYTHONPATH:/tmp/opara_nb_deps
}

stage_tests() {
  nb_deps
  # CUDA_TESTS: which test files / -k to run (default all), e.g. "tests/test_runtime_cuda.py -k 'not nasnet'"
  local log="$PARTS/cuda_tests${CUDA_TESTS_TAG:+_$CUDA_TESTS_TAG}.txt"
  eval "bounded \"\${CUDA_TEST_TIMEOUT:-300}\" python -m pytest ${CUDA_TESTS:-} -m \"cuda and not fused\" -q -rfEs \
    --timeout 150 --durations=12 --show-capture=no -p no:cacheprovider" 2>&1 | grep -v "^USDT" | tee "$log"
  [ -n "${OUT:-}" ] && cp "$log" "$OUT/" 2>/dev/null
  report
}

# issue 13's GPU record: the call path over a raw replay (with a cProfile of where it goes), and never slower than a
# plain CUDA graph on models beyond the paper's six
stage_trust() {
  bounded "${OVERHEAD_TIMEOUT:-150}" python benchmarks/call_overhead.py --md "$PARTS/call_overhead.md" 2>&1 \
    | grep -v "^USDT" | tail -5
  bounded "${NEVER_SLOWER_TIMEOUT:-240}" python benchmarks/never_slower.py --iters 100 --md "$PARTS/never_slower.md" \
    ${NEVER_SLOWER_MODELS:+--models "$NEVER_SLOWER_MODELS"} 2>&1 | grep -v "^USDT" | tail -20
  [ -n "${OUT:-}" ] && cp "$PARTS/call_overhead.md" "$PARTS/never_slower.md" "$OUT/" 2>/dev/null
  report
}

# issue 13's memory question: speed and graph memory against the number of physical streams
stage_memory() {
  bounded "${MEMORY_TIMEOUT:-300}" python benchmarks/streams_memory.py ${MEMORY_MODELS:+--models "$MEMORY_MODELS"} \
    --md "$PARTS/streams_memory.md" 2>&1 | grep -v "^USDT" | tail -30
  [ -n "${OUT:-}" ] && cp "$PARTS/streams_memory.md" "$OUT/" 2>/dev/null
  report
}

# issue 10's compile-time targets: fused planning cold and warm against reduce-overhead, each in a fresh process
stage_compile() {
  bounded "${COMPILE_TIMEOUT:-500}" python benchmarks/compile_time.py --model "${COMPILE_MODEL:-googlenet}" \
    ${COMPILE_PROFILE:+--profile-warm} ${COMPILE_PYCACHE:+--pycache "$COMPILE_PYCACHE"} --md "$PARTS/compile_time_${COMPILE_MODEL:-googlenet}.md" 2>&1 \
    | grep -v "^USDT" | tee "$PARTS/compile_time_${COMPILE_MODEL:-googlenet}.log" | tail -12
  [ -n "${OUT:-}" ] && cp "$PARTS/compile_time_${COMPILE_MODEL:-googlenet}.log" "$OUT/" 2>/dev/null
  [ -n "${OUT:-}" ] && cp "$PARTS/compile_time_${COMPILE_MODEL:-googlenet}.md" "$OUT/" 2>/dev/null
  report
}

stage_fused() {
  bounded 90 python benchmarks/event_cost.py --json "$PARTS/event_cost.json" 2>&1 | tee "$PARTS/event_cost.txt"
  bounded "${FUSED_TEST_TIMEOUT:-480}" python -m pytest tests/test_fused_cuda.py -q -rs -s -k "${FUSED_TESTS:-not nasnet}" \
    2>&1 | grep -v "^USDT" | tee "$PARTS/fused_tests.txt"
  [ -n "${OUT:-}" ] && cp "$PARTS/fused_tests.txt" "$PARTS/event_cost.txt" "$OUT/" 2>/dev/null
  report
}

stage_probe() {
  [ "$MODELS_GIVEN" -gt 0 ] || MODELS=(googlenet deepfm)
  for m in "${MODELS[@]}"; do
    bounded "${MODEL_TIMEOUT_S:-300}" python benchmarks/fused_probe.py --model "$m" --json "$PARTS/fused_probe_$m.json" \
      2>&1 | grep -v "^USDT" | tee "$PARTS/fused_probe_$m.txt"
  done
  report
}

stage_bench() {
  for m in "${MODELS[@]}"; do
    # one process per model: a crash or hang in one model leaves the others' numbers
    bounded "${MODEL_TIMEOUT_S:-${MODEL_TIMEOUT[$m]:-150}}" python -m opara_nb bench --model "$m" --batch 1 --modes "$MODES" \
      --iters "$ITERS" --json "$PARTS/bench_$m.json" --md "$PARTS/bench_$m.md" 2>&1 | tee "$PARTS/bench_$m.log"
    echo "bench $m: exit ${PIPESTATUS[0]}" | tee -a "$PARTS/commands.txt"
    report
  done
}

stage_quick() {
  [ "$MODELS_GIVEN" -gt 0 ] || MODELS=(googlenet deepfm bert)
  stage_bench
}

stage_sweep() {
  bounded 480 python -m opara_nb bench --model "$SWEEP_MODEL" --batch "$SWEEP_BATCHES" --modes "$SWEEP_MODES" \
    --iters "$ITERS" --json "$PARTS/sweep_$SWEEP_MODEL.json" --md "$PARTS/sweep_$SWEEP_MODEL.md" 2>&1 \
    | tee "$PARTS/sweep_$SWEEP_MODEL.log"
  report
}

stage_profile() {
  # issue 3's recorded run: attribution vs the profiler's total, classes, profiling time
  for m in googlenet bert; do
    bounded 120 python -m opara_nb profile --model "$m" --device cuda --top 25 --json "$PARTS/profile_$m.json" \
      2>&1 | grep -v "^USDT" | tee "$PARTS/profile_$m.txt"
  done
  report
}

stage_alloc() {
  # capture runs on the CPU here: allocation time is pure host work
  bounded 300 python -m opara_nb alloc --model all --json "$PARTS/alloc.json" --md "$PARTS/alloc.md" 2>&1 \
    | tee "$PARTS/alloc.log"
  report
}

[ "$STAGE" = report ] || [ "$STAGE" = all ] || [ "$STAGE" = env ] || stage_env
case "$STAGE" in
  env) stage_env; report ;;
  tests) stage_tests ;;
  trust) stage_trust ;;
  fused) stage_fused ;;
  compile) stage_compile ;;
  memory) stage_memory ;;
  probe) stage_probe ;;
  bench) stage_bench ;;
  quick) stage_quick ;;
  sweep) stage_sweep ;;
  alloc) stage_alloc ;;
  profile) stage_profile ;;
  report) report ;;
  all) stage_env; CUDA_TEST_TIMEOUT=${CUDA_TEST_TIMEOUT:-150} stage_tests; stage_bench; stage_sweep; stage_alloc ;;
  *) echo "unknown stage '$STAGE'; use env|tests|trust|fused|probe|bench|quick|sweep|alloc|profile|report|all" >&2; exit 2 ;;
esac
echo "==== $RES/$NAME.md ===="
cat "$RES/$NAME.md"

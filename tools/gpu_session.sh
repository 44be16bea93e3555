#!/usr/bin/env bash
# The one command to run on a lent GPU machine (H100/H200 through the device tool), from the repository root:
#
#     bash tools/gpu_session.sh [all|tests|bench|ffn|diag|gen|train]     # carry: [".whl"] (optional, see below)
#
# It installs sparsert (editable, offline), records the environment, builds every kernel for the device's
# architecture in parallel (warming the NVRTC cache), runs the GPU test suite (`pytest -m gpu`), the kernel
# benchmark (tools/bench_kernels.py) and the FFN training-step benchmark (tools/bench_ffn_train_step.py,
# issue 3), and writes everything under $OUT (the device tool's output folder; ./gpu-session-out elsewhere).
# The 8 files that come back from $OUT (the device tool returns at most 8: keep it that way):
#   summary.txt  env.txt (install log, versions, kernel builds)  logs.txt (the GPU tests' and benchmarks' output,
#   one section each)  bench.md  bench.json  dispatch.json (the dispatcher's measured per-shape choices)
#   ffn.md  ffn.json
# `tests`, `bench`, `ffn` or `diag` runs only that part (the benchmarks both run under `bench`). `diag` is
# tools/diagnose_sm90.py (Hopper only: why the wgmma kernels are slow); its table goes into logs.txt. `all`
# runs it after the benchmarks, in whatever time is left (at most DIAG_TIMEOUT=120 s), then `gen`
# (tools/bench_generate.py: decode tokens/s of the GPU runtime, eager vs CUDA graph, then a transformers Llama
# dense vs swap_sparse_linears; at most GEN_TIMEOUT=60 s, rows printed as measured into logs.txt). `train` (tools/bench_train_step.py: a whole-model training step, dense vs the Hu recipe on
# each --sparse-gemm; at most TRAIN_TIMEOUT=90 s, table in logs.txt) runs only when asked for (not in `all`).
#
# Time budget: one device call must end within 600 s. Set-up steps have fixed caps (carried wheels 60 s,
# install 60 s, environment + parallel kernel builds 150 s: 270 s at most); the measured phases are each
# cut to the time left before DEADLINE (default 570 s after the start) minus what the later phases keep:
#   GPU tests         min(TESTS_TIMEOUT=240, left - BENCH_MIN (60) - FFN_TIMEOUT), shared by the test files
#   kernel benchmark  min(BENCH_TIMEOUT=270, left - FFN_TIMEOUT)
#   FFN benchmark     min(FFN_TIMEOUT=110, left)   (expected ~30-60 s at d=4096, 16k tokens, 10 repeats)
#   diagnosis         min(DIAG_TIMEOUT=120, left)  (in whatever time the others left)
#   generate          min(GEN_TIMEOUT=60, left)    (last)
# so everything has ended by 570 s (+5 s if a phase ignores SIGINT and is killed), leaving the rest for the
# tails below and the copy-back. A phase left with under 20 s is skipped and says so in summary.txt.
#
# The machine has no network. Its image holds torch (CUDA), cuda-python, cuda-core, hypothesis, pytest,
# safetensors, click, onnx, onnxruntime, transformers. Optional carried wheels in .whl/ (gitignored; name
# ".whl" in the run's carry list) are installed into /tmp/site and used when they import; we carry
# cuda-core 1.2.2 + cuda-pathfinder 1.9.0 (the versions the code was written against) and pyelftools (kernel
# registers read from the cubin; without it they come from ptxas' log alone):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d .whl cuda-core==1.2.2 cuda-pathfinder==1.9.0 pyelftools==0.33
# Phases have their own time limits so one hang cannot eat the whole call.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-session-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export SPARSERT_CACHE_DIR=${SPARSERT_CACHE_DIR:-/tmp/sparsert-cache/kernels}
export SPARSERT_DISPATCH_CACHE=${SPARSERT_DISPATCH_CACHE:-$OUT/dispatch.json}
PY=${PYTHON:-python3}
MODE=${1:-all}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-240}
TMA_OK=${TMA_OK:-0}
MC_OK=${MC_OK:-0}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-270}
BENCH_MIN=${BENCH_MIN:-60}
FFN_TIMEOUT=${FFN_TIMEOUT:-110}
DIAG_TIMEOUT=${DIAG_TIMEOUT:-120}
GEN_TIMEOUT=${GEN_TIMEOUT:-60}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-90}
DEADLINE=${DEADLINE:-570}
START=$(date +%s)
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
log_section() { { echo "==== $1 ===="; cat "$2"; echo; } >> "$OUT/logs.txt"; }  # TITLE FILE
# phase_limit CAP KEEP: seconds a phase may run = min(CAP, time left before DEADLINE - KEEP for later phases).
phase_limit() {
  local left=$(( DEADLINE - ($(date +%s) - START) - $2 ))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
# log_phase NAME CAP SCRIPT [ARGS...]: run a tool whose table goes into logs.txt only, within min(CAP, time left).
log_phase() {
  local name=$1 limit rc
  limit=$(phase_limit "$2" 0)
  shift 2
  if [ "$limit" -ge 20 ]; then
    timeout --signal=INT --kill-after=5 "$limit" $PY "$@" > "/tmp/$name.log" 2>&1
    rc=$?
    log_section "$1 (exit $rc)" "/tmp/$name.log"
    summary "$name: exit $rc (limit ${limit}s; table in logs.txt)"
  else
    summary "$name: skipped, ${limit}s left"
  fi
}
: > "$OUT/summary.txt"
: > "$OUT/logs.txt"
: > "$OUT/env.txt"
rm -f /tmp/bench.log /tmp/ffn.log  # the closing tails must not show an earlier call's logs

# 1. Optional carried wheels (checked from /tmp: the repo's cuda/ folder would shadow NVIDIA's cuda package).
if compgen -G ".whl/*.whl" > /dev/null; then
  if timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
       >> "$OUT/env.txt" 2>&1 \
     && (cd /tmp && PYTHONPATH=/tmp/site $PY -c "import cuda.core, cuda.bindings.driver; cuda.core.Device") \
       >> "$OUT/env.txt" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    summary "carried wheels: in use ($(ls .whl | tr '\n' ' '))"
  else
    summary "carried wheels: not usable here, using the image's packages (see env.txt)"
  fi
fi

# pyelftools (pure Python; kernel registers read from the cubin) is usable whatever became of the CUDA wheels.
if compgen -G ".whl/pyelftools-*.whl" > /dev/null && ! (cd /tmp && $PY -c "import elftools" 2> /dev/null); then
  if timeout 30 $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-elf .whl/pyelftools-*.whl \
       >> "$OUT/env.txt" 2>&1; then
    export PYTHONPATH=/tmp/site-elf${PYTHONPATH:+:$PYTHONPATH}
    summary "pyelftools: carried wheel in use"
  fi
fi

# 2. sparsert itself: editable, offline, no build isolation (setuptools comes from the image).
if timeout 60 $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/env.txt" 2>&1; then
  summary "install: ok"
else
  summary "install: FAILED (see env.txt)"
fi

# 3. Environment.
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) ($(git status --porcelain 2>/dev/null | wc -l) changed files)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  (cd /tmp && timeout 150 $PY - <<'EOF'
# Versions, the device as sparsert sees it, then every registered kernel built for this GPU's architecture
# in parallel (NVRTC releases the GIL), so tests and benchmark load from the cache.
import importlib.metadata as md
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

print("python", sys.version.split()[0])
for name in ("torch", "cuda-python", "cuda-bindings", "cuda-core", "cuda-pathfinder", "nvidia-cuda-nvrtc",
             "nvidia-cusparselt-cu13", "triton", "numpy", "hypothesis", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "-")
import torch

print("torch.cuda", torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("cusparselt", getattr(torch.backends.cusparselt, "version", lambda: None)())
from sparsert.runtime.device import get_device, probe_gpu
from sparsert.runtime.kernel_build import all_kernel_specs, check_arch, compile_kernel, nvrtc_version

print("probe", probe_gpu())
print("nvrtc", nvrtc_version())
d = get_device(0)
print("device", d.name, d.compute_capability, d.arch, d.sm_count, "SMs", d.total_memory, "bytes")
specs = []
for key, spec in all_kernel_specs().items():
    try:
        check_arch(spec, d.arch)
        specs.append((key, spec))
    except Exception:
        pass


def build(item):
    key, spec = item
    t = time.time()
    try:
        ck = compile_kernel(spec, d.arch)
        return f"{key}: {time.time() - t:.1f}s spills {ck.spill_stores}/{ck.spill_loads} regs {ck.registers}"
    except Exception as exc:
        return f"{key}: FAILED {exc}"


with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
    for line in pool.map(build, specs):
        print("build", line)
EOF
  ) || echo "environment/build step failed: exit $?"
} >> "$OUT/env.txt" 2>&1
summary "device: $(grep '^device' "$OUT/env.txt" || echo 'unknown (see env.txt)')"
summary "kernel builds for this GPU: $(grep -c '^build ' "$OUT/env.txt") ($(grep -c '^build .*FAILED' "$OUT/env.txt") failed)"

# 4. GPU tests (every test marked gpu, across the suite), one pytest process per test file, kernel units first:
# a kernel fault (illegal address, ...) leaves the process's CUDA context unusable, so it must not take the
# later files down with it. SPARSERT_SYNC_LAUNCHES=1 waits after each of our launches, so a fault is reported
# with the kernel's name by the test that caused it.
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  keep=0
  [ "$MODE" = all ] && keep=$(( BENCH_MIN + FFN_TIMEOUT ))
  files=""
  for f in tests/test_sparse_gemm.py tests/test_sparse_gemm_tma.py tests/test_sparse_gemm_cluster.py \
           tests/test_mvue24_kernel.py \
           tests/test_gpu_runtime.py \
           $(grep -l "mark.gpu\|^gpu = " tests/test_*.py); do
    case " $files " in *" $f "*) ;; *) [ -f "$f" ] && files="$files $f" ;; esac
  done
  tests_end=$(( $(date +%s) + $(phase_limit "$TESTS_TIMEOUT" "$keep") ))  # the whole phase's budget
  for f in $files; do
    name=$(basename "$f" .py)
    limit=$(( tests_end - $(date +%s) ))
    if [ "$limit" -lt 20 ]; then
      summary "gpu tests $name: skipped, ${limit}s left"
      continue
    fi
    SPARSERT_SYNC_LAUNCHES=1 timeout --signal=INT --kill-after=5 "$limit" $PY -m pytest -q -m gpu -rs \
      -p no:cacheprovider "$f" > "/tmp/gpu-tests-$name.log" 2>&1
    rc=$?
    log_section "gpu tests $f (exit $rc, limit ${limit}s)" "/tmp/gpu-tests-$name.log"
    summary "gpu tests $name: exit $rc (limit ${limit}s): $(grep -E '(passed|failed|error|skipped|deselected)' "/tmp/gpu-tests-$name.log" | tail -n 1)"
    [ "$name" = test_sparse_gemm_tma ] && [ "$rc" -eq 0 ] && TMA_OK=1
    [ "$name" = test_sparse_gemm_cluster ] && [ "$rc" -eq 0 ] && MC_OK=1
  done
fi

# The TMA kernels (and the 2-CTA cluster ones, sm90mc_*) run in the benchmarks only after their GPU tests passed
# in this call (TMA_OK=1 / MC_OK=1 from the environment vouches for an earlier call): a faulting kernel would end
# the benchmark's process at its first such case.
if [ "$MODE" != tests ] && [ "$TMA_OK" != 1 ]; then
  export SPARSERT_DISABLE_KERNELS=${SPARSERT_DISABLE_KERNELS:+$SPARSERT_DISABLE_KERNELS,}sm90tma
  summary "TMA kernels not passed here: SPARSERT_DISABLE_KERNELS=$SPARSERT_DISABLE_KERNELS for what follows"
fi
if [ "$MODE" != tests ] && [ "$MC_OK" != 1 ]; then
  export SPARSERT_DISABLE_KERNELS=${SPARSERT_DISABLE_KERNELS:+$SPARSERT_DISABLE_KERNELS,}sm90mc
  summary "cluster kernels not passed here: SPARSERT_DISABLE_KERNELS=$SPARSERT_DISABLE_KERNELS for what follows"
fi

# 5. Kernel benchmark (one run, one table; baselines in the same run).
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  limit=$(phase_limit "$BENCH_TIMEOUT" "$FFN_TIMEOUT")
  if [ ! -f tools/bench_kernels.py ]; then
    summary "bench: tools/bench_kernels.py not found"
  elif [ "$limit" -ge 20 ]; then
    timeout --signal=INT --kill-after=5 "$limit" $PY tools/bench_kernels.py --out "$OUT/bench.md" \
      --json "$OUT/bench.json" > /tmp/bench.log 2>&1
    rc=$?
    log_section "tools/bench_kernels.py (exit $rc)" /tmp/bench.log
    summary "bench: exit $rc (limit ${limit}s; bench.md, bench.json, logs.txt)"
  else
    summary "bench: skipped, ${limit}s left"
  fi
fi

# 6. FFN training step, 2:4 vs dense (issue 3: >= 1.3x at d=4096, ffn 4d, 16k tokens, bf16; device recorded).
if [ "$MODE" = all ] || [ "$MODE" = bench ] || [ "$MODE" = ffn ]; then
  limit=$(phase_limit "$FFN_TIMEOUT" 0)
  if [ ! -f tools/bench_ffn_train_step.py ]; then
    summary "ffn: tools/bench_ffn_train_step.py not found"
  elif [ "$limit" -ge 20 ]; then
    timeout --signal=INT --kill-after=5 "$limit" $PY tools/bench_ffn_train_step.py --out "$OUT/ffn.md" \
      --json "$OUT/ffn.json" > /tmp/ffn.log 2>&1
    rc=$?
    log_section "tools/bench_ffn_train_step.py (exit $rc)" /tmp/ffn.log
    summary "ffn: exit $rc (limit ${limit}s; ffn.md, ffn.json, logs.txt): $(grep '^Target:' "$OUT/ffn.md" 2>/dev/null)"
  else
    summary "ffn: skipped, ${limit}s left"
  fi
fi

# 7. Bottleneck diagnosis of the Hopper kernels (full / mma_only / load_only builds, host and launch times).
if [ "$MODE" = all ] || [ "$MODE" = diag ]; then
  log_phase diag "$DIAG_TIMEOUT" tools/diagnose_sm90.py --out /tmp/diagnose_sm90.md
fi

# 8. Decode speed of `generate --backend runtime`: eager vs CUDA graph vs dense torch.
if [ "$MODE" = all ] || [ "$MODE" = gen ]; then
  log_phase gen "$GEN_TIMEOUT" tools/bench_generate.py --out /tmp/generate.md
fi

# 9. Whole-model training step, dense vs the Hu recipe on each --sparse-gemm (only when asked for).
if [ "$MODE" = train ]; then
  log_phase train "$TRAIN_TIMEOUT" tools/bench_train_step.py --out /tmp/train_step.md
fi

summary "elapsed: $(( $(date +%s) - START )) s"
echo "---- bench (tail) ----"; tail -n 40 "$OUT/bench.md" 2>/dev/null || tail -n 20 /tmp/bench.log 2>/dev/null
echo "---- ffn (tail) ----"; tail -n 30 "$OUT/ffn.md" 2>/dev/null || tail -n 20 /tmp/ffn.log 2>/dev/null
echo "---- summary ----"; cat "$OUT/summary.txt"

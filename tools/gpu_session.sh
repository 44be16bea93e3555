#!/usr/bin/env bash
# The one command to run on a lent GPU machine (H100/H200 through the device tool), from the repository root:
#
#     bash tools/gpu_session.sh [all|tests|bench]     # carry: [".whl"] (optional, see below)
#
# It installs sparsert (editable, offline), records the environment, builds every kernel for the device's
# architecture in parallel (warming the NVRTC cache), runs the GPU test suite (`pytest -m gpu`) and the kernel
# benchmark (tools/bench_kernels.py), and writes everything under $OUT (the device tool's output folder;
# ./gpu-session-out elsewhere). The 8 files that come back from $OUT:
#   summary.txt  env.txt (install log, versions, kernel builds)  gpu-tests.log  gpu-tests.xml
#   bench.log  bench.md  bench.json  dispatch.json (the dispatcher's measured per-shape choices)
# `tests` or `bench` runs only that part (one device call must end within 600 s).
#
# The machine has no network. Its image holds torch (CUDA), cuda-python, cuda-core, hypothesis, pytest,
# safetensors, click, onnx, onnxruntime, transformers. Optional carried wheels in .whl/ (gitignored; name
# ".whl" in the run's carry list) are installed into /tmp/site and used when they import; we carry
# cuda-core 1.2.2 + cuda-pathfinder 1.9.0 (the versions the code was written against):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d .whl cuda-core==1.2.2 cuda-pathfinder==1.9.0
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
BENCH_TIMEOUT=${BENCH_TIMEOUT:-270}
START=$(date +%s)
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
: > "$OUT/env.txt"

# 1. Optional carried wheels (checked from /tmp: the repo's cuda/ folder would shadow NVIDIA's cuda package).
if compgen -G ".whl/*.whl" > /dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
       >> "$OUT/env.txt" 2>&1 \
     && (cd /tmp && PYTHONPATH=/tmp/site $PY -c "import cuda.core, cuda.bindings.driver; cuda.core.Device") \
       >> "$OUT/env.txt" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    summary "carried wheels: in use ($(ls .whl | tr '\n' ' '))"
  else
    summary "carried wheels: not usable here, using the image's packages (see env.txt)"
  fi
fi

# 2. sparsert itself: editable, offline, no build isolation (setuptools comes from the image).
if $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/env.txt" 2>&1; then
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

# 4. GPU tests (every test marked gpu, across the suite).
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  timeout --signal=INT "$TESTS_TIMEOUT" $PY -m pytest -q -m gpu -rs -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml" tests > "$OUT/gpu-tests.log" 2>&1
  rc=$?
  summary "gpu tests: exit $rc: $(tail -n 1 "$OUT/gpu-tests.log")"
fi

# 5. Kernel benchmark (one run, one table; baselines in the same run).
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  if [ -f tools/bench_kernels.py ]; then
    timeout --signal=INT "$BENCH_TIMEOUT" $PY tools/bench_kernels.py --out "$OUT/bench.md" \
      --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
    summary "bench: exit $? (bench.md, bench.json, bench.log)"
  else
    summary "bench: tools/bench_kernels.py not found"
  fi
fi

summary "elapsed: $(( $(date +%s) - START )) s"
echo "---- gpu tests (tail) ----"; tail -n 25 "$OUT/gpu-tests.log" 2>/dev/null
echo "---- bench (tail) ----"; tail -n 40 "$OUT/bench.md" 2>/dev/null || tail -n 20 "$OUT/bench.log" 2>/dev/null
echo "---- summary ----"; cat "$OUT/summary.txt"

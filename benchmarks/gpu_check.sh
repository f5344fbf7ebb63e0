#!/usr/bin/env bash
# The one GPU check (issue 4 item 7): on a fresh GPU machine that already has
# torch and triton, build the extension, run the GPU tests, then the kernel and
# model benchmarks at real sizes; everything lands in OUTDIR (JSON, logs,
# steps.jsonl with each step's exit status and seconds).  Each step has a time
# limit (460 s in all), so the whole run stays under 8 minutes; a failing step does not stop
# the later ones.  Exit status: 0 only if every step succeeded.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# PYTHON (default: python) picks the interpreter; MODEL_BENCH_ARGS overrides
# the model benchmark's arguments.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
FAILED=0

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, output in OUTDIR/NAME.log
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$((SECONDS - start))" >>"$OUT/steps.jsonl"
    echo "   rc=$rc after $((SECONDS - start)) s; last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
    [ "$rc" -eq 0 ] || FAILED=1
}

: >"$OUT/steps.jsonl"
step environment 30 "$PY" -c "
import platform, subprocess, torch, triton
print('python', platform.python_version(), 'torch', torch.__version__, 'triton', triton.__version__)
print('device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())
print('git', subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip())
"

# 1. the extension (CUDA kernels when a toolkit is present), for this GPU's architecture only
if command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c \
        "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
fi
step build 110 "$PY" setup.py build_ext --inplace

# 2. the GPU tests (bf16 included)
step gpu_tests 120 "$PY" -m pytest -q -m gpu tests --junitxml="$OUT/gpu_tests.xml"

# 3. the Triton kernels at DenseNet-121 block-3 shapes -> triton_kernels.json
step triton_kernels 120 "$PY" benchmarks/triton_kernels.py "$OUT"

# 4. the model benchmark (DenseNet-121, batch 256, 224x224, bf16 autocast, channels-last)
if "$PY" -c "import densenet_fast.bench.models" 2>/dev/null; then
    # shellcheck disable=SC2086
    step model_bench 80 "$PY" -m densenet_fast bench models ${MODEL_BENCH_ARGS:---device cuda \
        --model densenet121 --batch 256 --image-size 224 --autocast bfloat16 --channels-last \
        --impls tv-eager tv-memeff fast-triton-keep fast-triton-recompute --budget-gib 0 \
        --warmup 2 --repeats 5 --no-progress --out "$OUT/models_cuda_densenet121_b256.json"}
else
    echo "== model_bench skipped: densenet_fast.bench.models does not exist" | tee "$OUT/model_bench.log"
fi

echo "results in $OUT (steps: $OUT/steps.jsonl)"
exit "$FAILED"

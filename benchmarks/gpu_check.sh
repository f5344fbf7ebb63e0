#!/usr/bin/env bash
# The one GPU check: on a fresh GPU machine that has torch and triton, run the
# Triton path's tests and benchmarks in order of value, each step under its own
# time limit, so that one run of at most 9 minutes always leaves evidence:
#
#   [GIT_REVISION=<commit>] benchmarks/gpu_check.sh [--dry-run] [--steps STEP,STEP...] OUTDIR
#
# Time budget (limits, seconds; for an H200 with 16 cores, Triton 3.6, a cold
# Triton cache: set from the first run's times, docs/gpu.md):
#
#   step            limit  what                                                    evidence in OUTDIR
#   environment       15   versions, device, optional modules, revision            environment.json
#   triton_tests     110   test_triton_ops.py, test_backends.py -m gpu, 6 shards   triton_tests_<i>.{log,xml}
#     build         (110)  meanwhile, in the background: the C++/CUDA extension    build.log
#   gpu_tests         85   the other gpu-marked tests, 6 shards (needs the build)  gpu_tests_<i>.{log,xml}
#   triton_kernels    65   benchmarks/triton_kernels.py (bench kernels preset):     triton_kernels.json
#                          block-3 and block-1 layers and transitions, with errors
#   memory_model     110   the memory model against torch.cuda.max_memory_allocated: memory.json
#                          DenseNet-BC-250, batch 64, 32x32, keep and recompute,
#                          two steps each in a fresh process (docs/memory.md)
#   model_bench      135   DenseNet-121, batch 256, bf16 autocast, channels-last:   models.json
#                          tv-eager, fast-triton-keep, tv-memeff, tv-compile, one
#                          process each (step time and peak memory)
#   total            520   + at most 5 s per step after SIGINT = 550 s
#
# Steps run only when asked for (--steps), each on its own or with others:
#
#   reduce_probe  60 + 60  benchmarks/reduce_probe.py: the reduce configuration    reduce_probe.json,
#                          taken out after the first H200 run, per split and K      reduce_probe_toolkit.json
#                          block, with Triton's ptxas, then again with the CUDA
#                          toolkit's where there is one
#   depth_budget     250   the deepest DenseNet-BC (k=12, batch 64, 32x32) in 12e9  depth.json
#                          bytes for keep and auto: the planner's prediction and
#                          the next depth, each in a fresh process (issue 13)
#   offload_model 90 + 90  the memory model with save_on_cpu (--offload) against   memory_offload.json,
#                          measurement, DenseNet-121, batch 64, 224x224, bf16       memory_no_offload.json
#                          autocast, keep and recompute; then without it
#   kernel_graphs     90   triton_kernels with --cuda-graphs: each call captured    triton_kernels_graphs.json
#                          in a CUDA graph and its replay timed (the kernels'
#                          time without the host's launches)
#
# --steps takes the names above, comma-separated (environment is always run;
# build runs with gpu_tests); the default is every step of the first table.
#
# Every step appends {"step", "status" (ok, failed, timeout, skipped), "rc",
# "seconds", "limit", "why"} to OUTDIR/steps.jsonl when it ends, and a failing
# step does not stop the later ones.  A step past its limit gets SIGINT (so
# pytest still writes its junit XML; the benchmarks rewrite their JSON after
# every case), then SIGKILL 5 s later.  pytest runs with
# --continue-on-collection-errors, so a test file that cannot be imported
# (a failed build, no torchvision) costs that file only.  Every Triton
# configuration chosen is logged to OUTDIR/triton_configs.jsonl.  Nothing but
# torch and triton is assumed: without pytest the test steps are skipped (the
# kernel benchmark still compares every result with torch), without setuptools
# the build, without torchvision its benchmark cases; each says so.
#
# --dry-run: the same steps on the CPU through the Triton interpreter, with a
# handful of tests, tiny shapes and no compilation (tests/test_gpu_check.py
# runs it, so CI tests this script).  PYTHON picks the interpreter (default:
# python3); GIT_REVISION names the tree (before its git metadata: a copied tree
# can carry an older commit's).
# Exit status: 0 if every step run is ok, 1 otherwise, 2 for bad arguments.
set -uo pipefail

DEFAULT_STEPS=environment,triton_tests,gpu_tests,triton_kernels,memory_model,model_bench
KNOWN_STEPS=$DEFAULT_STEPS,reduce_probe,depth_budget,offload_model,kernel_graphs
usage() {
    echo "usage: $0 [--dry-run] [--steps STEP,STEP...] OUTDIR (steps: $KNOWN_STEPS)" >&2
    exit 2
}
DRY_RUN=0
STEPS=$DEFAULT_STEPS
while [ $# -gt 1 ]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --steps) STEPS=${2:-}; shift ;;
        *) usage ;;
    esac
    shift
done
[ $# -eq 1 ] && [ "${1#-}" = "$1" ] || usage
for name in ${STEPS//,/ }; do
    [[ ",$KNOWN_STEPS," == *",$name,"* ]] || { echo "unknown step: $name" >&2; usage; }
done

# wanted NAME: whether the run includes step NAME
wanted() {
    [[ ",environment,$STEPS," == *",$1,"* ]]
}
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export DENSENET_FAST_CONFIG_LOG="$OUT/triton_configs.jsonl"
GRACE=5  # seconds between SIGINT and SIGKILL

if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    SHARDS=2
    LIMIT_ENV=60 LIMIT_TRITON_TESTS=120 LIMIT_GPU_TESTS=60 LIMIT_KERNELS=120 LIMIT_MEMORY=60 LIMIT_MODELS=120
    TRITON_TESTS=(tests/test_triton_ops.py tests/test_backends.py
                  -k "test_bn_relu and triton-cpu-fp32 or configuration_follows_the_shapes")
    GPU_TESTS=(tests/test_extension.py -k "has_cuda_is_a_bool")
    BUILD=(setup.py --version)  # loads setup.py; compiling takes minutes on a CPU
    KERNELS=(--tiny)
    GRAPHS=() LIMIT_GRAPHS=120  # (no CUDA graphs on the CPU)
    MEMORY=(--device cpu --points densenet_bc-10:2 --image-size 8 --steps 1 --threads 1)
    MODELS=(--device cpu --model densenet_bc-10 --batch 2 --image-size 8 --channels-last
            --impls tv-eager fast-triton-keep --warmup 0 --repeats 1)
    LIMIT_PROBE=60 LIMIT_DEPTH=240 LIMIT_OFFLOAD=60
    OFFLOAD=(--device cpu --points densenet_bc-10:2 --image-size 8 --steps 1 --threads 1)
    PROBE=(--tiny)
    DEPTH=(--device cpu --batch 2 --image-size 8 --growth-rate 4 --budget-gib 0.002 --impls fast-torch-keep
           fast-torch-auto)
else
    SHARDS=6  # Triton compiles one kernel at a time per process; the build takes the other cores
    LIMIT_ENV=15 LIMIT_TRITON_TESTS=110 LIMIT_GPU_TESTS=85 LIMIT_KERNELS=65 LIMIT_MEMORY=110 LIMIT_MODELS=135
    LIMIT_PROBE=60 LIMIT_DEPTH=250 LIMIT_OFFLOAD=90  # the first point compiles (43 s for BC-250 on a cold cache)
    OFFLOAD=(--device cuda --points densenet121:64 --image-size 224 --autocast bfloat16 --steps 2)
    # the conformance suite's torch and triton runs go with the Triton tests, its cuda-backend runs after the build
    TRITON_TESTS=(-m gpu tests/test_triton_ops.py tests/test_backends.py -k "not cuda-cuda")
    GPU_TESTS=(-m gpu tests --ignore=tests/test_triton_ops.py --ignore=tests/test_gpu_check.py
               -k "not torch-cuda and not triton-cuda")
    BUILD_LIB=$(mktemp -d)  # not under OUTDIR: the module is large and need not come back
    BUILD=(setup.py build_ext --build-lib "$BUILD_LIB")
    KERNELS=()
    GRAPHS=(--cuda-graphs) LIMIT_GRAPHS=90  # triton_kernels' 65, and four more calls per case: warm-up and capture
    MEMORY=(--device cuda --points densenet_bc-250:64 --image-size 32 --steps 2)
    MODELS=(--device cuda --model densenet121 --batch 256 --image-size 224 --autocast bfloat16 --channels-last
            --impls tv-eager fast-triton-keep tv-memeff tv-compile --warmup 2 --repeats 5)
    PROBE=()
    # 12e9 bytes; auto's deepest (3526) was measured at 4309898, keep's was not (docs/gpu.md)
    DEPTH=(--device cuda --batch 64 --image-size 32 --growth-rate 12 --budget-gib 11.175870895385742 --impls
           fast-triton-keep fast-triton-auto)
fi

# record NAME STATUS RC START LIMIT [WHY]: one line of steps.jsonl and a summary on stdout
record() {
    local seconds=$((SECONDS - $4))
    printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d, "limit": %d, "why": "%s"}\n' \
        "$1" "$2" "$3" "$seconds" "$5" "${6:-}" >>"$OUT/steps.jsonl"
    echo "== $1: $2 (rc $3) after $seconds s of $5 s${6:+: $6}"
}

# status RC: the status of a command that ended with RC under `timeout`
status() {
    case $1 in
        0) echo ok ;;
        124 | 137) echo timeout ;;
        *) echo failed ;;
    esac
}

# limited LIMIT LOG COMMAND...: COMMAND under LIMIT seconds (SIGINT, SIGKILL GRACE s later), output in LOG
limited() {
    local limit=$1 log=$2
    shift 2
    timeout -s INT -k "$GRACE" "$limit" "$@" >"$log" 2>&1
}

# step NAME LIMIT COMMAND...: one step, its output in OUTDIR/NAME.log
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    limited "$limit" "$OUT/$name.log" "$@"
    rc=$?
    record "$name" "$(status $rc)" $rc $start "$limit"
    tail -n 12 "$OUT/$name.log" | sed 's/^/   | /'
}

# pytest_step NAME LIMIT PYTEST-ARGS...: pytest in SHARDS parallel processes (--shard I/N, tests/conftest.py),
# each with its own log and junit XML (OUTDIR/NAME_<i>.{log,xml}); a shard left without tests (rc 5) is ok
pytest_step() {
    local name=$1 limit=$2 start=$SECONDS rc=0 shard_rc i pids=()
    shift 2
    if ! "$PY" -c "import pytest" 2>/dev/null; then
        record "$name" skipped 0 $start "$limit" "pytest is not installed"
        return
    fi
    for ((i = 0; i < SHARDS; i++)); do
        limited "$limit" "$OUT/${name}_$i.log" "$PY" -m pytest -v -rfEs -p no:cacheprovider \
            --continue-on-collection-errors --durations=10 --junitxml="$OUT/${name}_$i.xml" \
            --shard "$i/$SHARDS" "$@" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid"
        shard_rc=$?
        if [ $shard_rc = 124 ] || [ $shard_rc = 137 ]; then
            rc=$shard_rc
        elif [ $shard_rc != 0 ] && [ $shard_rc != 5 ] && [ $rc = 0 ]; then
            rc=$shard_rc
        fi
    done
    record "$name" "$(status $rc)" $rc $start "$limit"
    tail -q -n 3 "$OUT/${name}"_*.log | sed 's/^/   | /'
}

# build_step: the extension, compiled into a temporary directory and copied into the package only when done
# (the test processes running meanwhile must not import a half-written module); CUDA kernels for this GPU only
build_step() {
    local start=$SECONDS rc
    if ! "$PY" -c "import setuptools" 2>/dev/null; then
        record build skipped 0 $start "$LIMIT_TRITON_TESTS" "setuptools is not installed"
        return
    fi
    if [ "$DRY_RUN" = 0 ] && { command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; }; then
        export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
        export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c \
            "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
    fi
    MAX_JOBS=$(($(nproc) > SHARDS ? $(nproc) - SHARDS : 1)) limited "$LIMIT_TRITON_TESTS" "$OUT/build.log" \
        "$PY" "${BUILD[@]}"
    rc=$?
    if [ $rc = 0 ] && [ "$DRY_RUN" = 0 ]; then
        cp "$BUILD_LIB"/densenet_fast/_C*.so densenet_fast/ >>"$OUT/build.log" 2>&1 || rc=1
    fi
    record build "$(status $rc)" $rc $start "$LIMIT_TRITON_TESTS"
}

: >"$OUT/steps.jsonl"
echo "GPU check$([ "$DRY_RUN" = 1 ] && echo ' (dry run: CPU, Triton interpreter)') -> $OUT"

step environment "$LIMIT_ENV" "$PY" - "$OUT/environment.json" "$DRY_RUN" <<'EOF'
"""Versions, device, optional modules and the source revision -> environment.json."""
import hashlib, importlib.metadata, importlib.util, json, os, pathlib, platform, shutil, subprocess, sys
import torch, triton

def version(module):
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "present" if importlib.util.find_spec(module) else None

def git_revision():  # $GIT_REVISION first: a copied tree can carry git metadata older than its files
    if os.environ.get("GIT_REVISION"):
        return os.environ["GIT_REVISION"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"

sources = sorted(p for top in ("densenet_fast", "csrc", "tests", "benchmarks") for p in pathlib.Path(top).rglob("*")
                 if p.suffix in (".py", ".sh", ".cpp", ".cu", ".h") and "__pycache__" not in p.parts)
digest = hashlib.sha256()
for path in sources + [pathlib.Path("setup.py")]:
    digest.update(str(path).encode() + b"\0" + path.read_bytes())
env = {"dry_run": sys.argv[2] == "1", "python": platform.python_version(), "torch": torch.__version__,
       "torch_cuda": torch.version.cuda, "triton": triton.__version__,
       "optional_modules": {m: version(m) for m in ("pytest", "torchvision", "numpy", "setuptools", "ninja")},
       "nvcc": shutil.which("nvcc"), "cpu_count": os.cpu_count(), "git_revision": git_revision(),
       "source_sha256": digest.hexdigest(), "triton_interpret": os.environ.get("TRITON_INTERPRET")}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env["device"] = {"name": p.name, "capability": list(torch.cuda.get_device_capability(0)),
                     "multiprocessors": p.multi_processor_count, "memory_bytes": p.total_memory,
                     "shared_memory_per_block_optin": p.shared_memory_per_block_optin}
pathlib.Path(sys.argv[1]).write_text(json.dumps(env, indent=1) + "\n")
print(json.dumps(env, indent=1))
EOF

if wanted gpu_tests; then
    build_step &
    BUILD_PID=$!
fi
wanted triton_tests && pytest_step triton_tests "$LIMIT_TRITON_TESTS" "${TRITON_TESTS[@]}"
if wanted gpu_tests; then
    wait $BUILD_PID
    pytest_step gpu_tests "$LIMIT_GPU_TESTS" "${GPU_TESTS[@]}"
fi
wanted triton_kernels && step triton_kernels "$LIMIT_KERNELS" "$PY" benchmarks/triton_kernels.py "$OUT" "${KERNELS[@]}"
wanted kernel_graphs && step kernel_graphs "$LIMIT_GRAPHS" "$PY" benchmarks/triton_kernels.py "$OUT" "${KERNELS[@]}" \
    "${GRAPHS[@]}" --out "$OUT/triton_kernels_graphs.json"
wanted memory_model && step memory_model "$LIMIT_MEMORY" "$PY" -m densenet_fast bench memory "${MEMORY[@]}" \
    --no-plot --out "$OUT/memory.json"
# the benchmarks stop starting workers 10 s before their limits, so that they end on their own
wanted model_bench && step model_bench "$LIMIT_MODELS" "$PY" benchmarks/bench_models.py --quick "${MODELS[@]}" \
    --budget-gib 0 --max-minutes "$(awk "BEGIN { print ($LIMIT_MODELS - 10) / 60 }")" --no-plot --no-progress \
    --out "$OUT/models.json"
if wanted reduce_probe; then
    step reduce_probe "$LIMIT_PROBE" "$PY" benchmarks/reduce_probe.py "$OUT/reduce_probe.json" "${PROBE[@]}"
    TOOLKIT_PTXAS=${CUDA_HOME:-/usr/local/cuda}/bin/ptxas
    if [ "$DRY_RUN" = 1 ]; then
        echo "== reduce_probe_toolkit: not in a dry run"
    elif [ ! -x "$TOOLKIT_PTXAS" ]; then
        echo "== reduce_probe_toolkit: no CUDA toolkit ptxas at $TOOLKIT_PTXAS"
    else  # (Triton falls back to its own ptxas where this one fails: reduce_probe_toolkit.json says which ran)
        step reduce_probe_toolkit "$LIMIT_PROBE" env TRITON_PTXAS_PATH="$TOOLKIT_PTXAS" "$PY" \
            benchmarks/reduce_probe.py "$OUT/reduce_probe_toolkit.json"
    fi
fi
if wanted offload_model; then
    step offload_model "$LIMIT_OFFLOAD" "$PY" -m densenet_fast bench memory "${OFFLOAD[@]}" --offload --no-plot \
        --no-progress --out "$OUT/memory_offload.json"
    step offload_baseline "$LIMIT_OFFLOAD" "$PY" -m densenet_fast bench memory "${OFFLOAD[@]}" --no-plot \
        --no-progress --out "$OUT/memory_no_offload.json"
fi
wanted depth_budget && step depth_budget "$LIMIT_DEPTH" "$PY" -m densenet_fast bench depth "${DEPTH[@]}" \
    --depths 40 --time-depths --probe-timeout 60 --max-minutes "$(awk "BEGIN { print ($LIMIT_DEPTH - 10) / 60 }")" \
    --no-plot --no-progress --out "$OUT/depth.json"

echo "results in $OUT (steps: $OUT/steps.jsonl)"
if grep -qv '"status": "ok"' "$OUT/steps.jsonl"; then
    exit 1
fi
exit 0

#!/usr/bin/env bash
# Everything the project measures on a GPU, in one call of under 8 minutes, on a bare offline machine.
#
#   bash benchmarks/gpu_suite.sh --prepare   # on a machine with pip access: cp312 wheels of what the GPU image lacks
#   FASTDISTILL_GIT_SHA=<sha> bash benchmarks/gpu_suite.sh   # on the GPU machine, from the checkout's root, with
#                                            # .whl/ beside it; the sha names the tree when its git metadata is stale
#   bash benchmarks/gpu_suite.sh --dry       # tiny sizes anywhere (CPU: Triton through TRITON_INTERPRET=1)
#   FASTDISTILL_GIT_SHA=<sha> bash benchmarks/gpu_suite.sh --tables   # instead of the kernels: the README's FADRM and
#                                            # LGM accuracy tables (benchmarks/accuracy_tables.py, TABLES_JOBS runs at once)
#
# The GPU image has torch, triton and timm but no network and none of hydra-core / omegaconf / antlr4 / nvtx, so
# `pip install -e .` cannot run there: the wheels install with --no-index into a target folder and the checkout goes
# on PYTHONPATH (kernels/ and configs/ linked where the editable install maps them). Each step has its own time cap
# and leaves its JSON (device name, versions, git sha in every file) in $OUT/results.tgz, re-packed after every
# step so a cut-off run still returns what it finished; $OUT/log.txt holds the output.
set -u
MODE=${1:-run}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WHEELS="hydra-core==1.3.2 omegaconf==2.3.0 nvtx==0.2.17 mlxtend==0.25.0 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
  pygments==2.21.0 matplotlib==3.11.2 contourpy==1.4.0 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3
  python-dateutil==4.0.0 six==1.17.0"   # what the --tables runs import beyond the image: digits, console, plots
SDISTS="antlr4-python3-runtime==4.9.3"   # omegaconf's pin; PyPI has no wheel of it: built here (pure Python)

if [ "$MODE" = "--prepare" ]; then
  mkdir -p .whl
  grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS && python3 -m pip wheel -q --no-deps -w .whl $SDISTS
  exit
fi
case "$MODE" in run|--dry|--tables) ;; *) echo "gpu_suite.sh: unknown mode '$MODE'; expected --prepare, --dry, --tables or none" >&2
  exit 2 ;; esac

export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
RES=$(mktemp -d)   # results outside $OUT: only the log and one archive come back
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
PY=${PYTHON:-python3}

if [ "$MODE" != "--dry" ]; then
  # only the wheels whose module the image lacks: never shadow the image's own packages
  MISSING=$($PY - <<'PY'
import glob, importlib.util, os
module = {"hydra_core": "hydra", "antlr4_python3_runtime": "antlr4", "markdown_it_py": "markdown_it",
          "python_dateutil": "dateutil", "fonttools": "fontTools"}
for w in sorted(glob.glob(".whl/*.whl")):
    dist = os.path.basename(w).split("-")[0]
    if importlib.util.find_spec(module.get(dist, dist)) is None:
        print(w)
PY
)
  if [ -n "$MISSING" ]; then
    echo "installing from .whl/: $(echo $MISSING | xargs -n1 basename | cut -d- -f1 | tr '\n' ' ')"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastdistill-site $MISSING || exit 2
    export PYTHONPATH=/tmp/fastdistill-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -c "import hydra, omegaconf, nvtx" 2>/dev/null || { echo "gpu_suite.sh: no .whl/ folder; run --prepare first" >&2
    exit 2; }
  if ! $PY -c "import fastdistill.kernels" 2>/dev/null; then   # what the editable install maps
    ln -sfn ../kernels fastdistill/kernels; ln -sfn ../configs fastdistill/configs
    export PYTHONPATH=$ROOT:$PYTHONPATH
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  # published sizes (benchmark docstrings and the GPU-ready issue)
  GC="--classes 1000 --dims 1536 --batches 512 --backbones 4"
  BN="--resolutions 224 --batch 100"
  AKL="--heads 12 --tokens 197 577 1025 --head-dim 64 --batch 32"
  FADRM="--resolution 224 --classes 100 --iterations 10"
  PARALLEL="--resolution 32 --classes 10 --groups 1 10 50 --iterations 5"   # CIFAR-10-sized recovery batches
  LGM="--backbones timm:vit_base_patch16_224 --classes 1000 --augs 10 --chunk-size 256 --image-size 224"
  TESTS="tests/kernels"
  SCALE=1
else
  export TRITON_INTERPRET=1
  XDIST=""
  GC="--classes 10 --dims 64 --batches 32 --backbones 2"
  BN="--resolutions 32 --batch 4"
  AKL="--heads 2 --tokens 33 --head-dim 16 --batch 2"
  FADRM="--arch test_resnet --resolution 32 --low 28 --classes 4 --iterations 1"
  PARALLEL="--resolution 16 --classes 2 --groups 1 2 --iterations 1"
  LGM="--backbones timm:test_vit --classes 4 --augs 2 --chunk-size 4 --image-size 32"
  TESTS="tests/kernels/test_grad_cosine.py --collect-only"   # the plumbing: pytest, the gpu marker, the imports
  SCALE=0
fi
$PY -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', \
timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

FAILED=0
step() {   # step CAP_SECONDS NAME command...: run under a cap, record rc, re-pack the results
  local cap=$1 name=$2; shift 2
  [ "$SCALE" = 0 ] && cap=$((cap * 3))   # the interpreter is slower than any GPU, even at tiny sizes
  echo "=== $(date +%T) $name (cap ${cap}s): $*"
  timeout -k 5 "$cap" "$@"
  local rc=$?
  echo "=== $(date +%T) $name rc=$rc"
  [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
  echo "$name $rc" >> "$RES/steps.txt"
  tar czf "$OUT/results.tgz" -C "$RES" .
}

if [ "$MODE" = "--tables" ]; then   # the runs' folders (teachers, images) stay here: only the numbers come back
  TAB=$(mktemp -d)
  step $((${TABLES_BUDGET:-420} + 60)) accuracy_tables $PY benchmarks/accuracy_tables.py --out-dir "$TAB" \
    --budget "${TABLES_BUDGET:-420}" --jobs "${TABLES_JOBS:-4}" --parallel-batches 50 ${TABLES_ARGS:-}   # e.g.
    # TABLES_ARGS="--ipc 10"; all recovery batches of a run side by side: 10 digits of 28 px leave a GPU idle
  mkdir -p "$RES/tables" && cp "$TAB/accuracy_tables.json" "$TAB/runs.log" "$RES/tables/" 2>/dev/null
  (cd "$TAB" && find runs -name metrics.json | tar czf "$RES/tables/run_metrics.tgz" -T -)
  tar czf "$OUT/results.tgz" -C "$RES" .
  echo "=== steps failed: $FAILED; results: $OUT/results.tgz"
  exit $((FAILED > 0))
fi

# 1. every kernel test on the device, the gpu-marked published sizes included (the AOT compile check is CPU work)
step 90 tests $PY -m pytest $TESTS $XDIST -q -p no:cacheprovider -m "gpu or not slow" --ignore-glob="*aot*" -rfE \
  --junitxml="$RES/kernel_tests.xml"
# 2. each kernel against its eager reference at published sizes, fp32 and bf16 (speedup, peak-memory ratio)
for dtype in float32 bfloat16; do
  step 40 "grad_cosine_$dtype" $PY benchmarks/bench_grad_cosine.py $GC --dtype $dtype --rounds 2 --out-dir "$RES/gc_$dtype"
  step 40 "bn_stats_$dtype" $PY benchmarks/bench_bn_stats.py $BN --dtype $dtype --rounds 2 --out-dir "$RES/bn_$dtype"
  step 45 "attention_kl_$dtype" $PY benchmarks/bench_attention_kl.py $AKL --dtype $dtype --rounds 2 \
    --out-dir "$RES/akl_$dtype"
done
# 3. FADRM recovery at 224 px, batch 100: s/image and peak memory per provider (paper: 0.47 s, 2.9 GB, RTX 4090)
step 100 fadrm $PY benchmarks/bench_fadrm.py --providers eager fast_bn mpt_mro $FADRM --repeats 1 --bn-resolutions \
  --out-dir "$RES/fadrm"
# 3b. FADRM batches of a small-image set side by side (method.parallel_batches) against one at a time
step 90 parallel_batches $PY benchmarks/bench_parallel_batches.py $PARALLEL --repeats 2 --out-dir "$RES/parallel"
# 4. the ImageNet-1k-shaped two-pass LGM step: ViT-B/16, 1000 classes, 10 augs, bf16 (one-pass would need ~1 TB)
step 80 lgm_in1k $PY benchmarks/bench_lgm.py --sweep-child $LGM --ipc 1 --precision bf16 --warmup 1 --repeats 2 \
  --out-dir "$RES/lgm"

echo "=== steps failed: $FAILED; results: $OUT/results.tgz"
[ "$MODE" = "--dry" ] && cp -r "$RES"/. "$OUT"/ 2>/dev/null
exit $((FAILED > 0))

#!/usr/bin/env bash
# The GPU check of issue 20, item 5, in one call on a machine with one CUDA GPU (no network), ~7 minutes:
#   1. environment: nvidia-smi, python / torch / torchvision, CPUs; the carried wheels (.whl/) installed into
#      /tmp/site; every plugdet module imported (an API this torch lacks fails here)
#   2. tests/test_cuda.py: fp16 AMP + GradScaler through the engine vs float32, channels_last vs NCHW, the pinned
#      loader, a 1-process NCCL group (+ DDP); tests/test_fp16_fallback.py: auto's fp16 left for bf16 on a real fp16
#      overflow on CUDA
#   3. the synthetic mini-CUB scaled up (generated in the background during 2), exported to YOLO txt
#   4. bench/bench_train_vs_ultralytics.py --device cuda: YOLOv8n at 640 from scratch, plugdet (fp16 AMP +
#      channels_last) beside Ultralytics (its default AMP), same images and epochs, img/s and AP by one evaluator
#   5. bench/bench_loader.py: the loader alone, same batch, size and workers as 4
#   6. one epoch of each configs/det/*_cub.yaml family (img/s, wall, AP), on the same data
#   7. if time is left: a CPU-test subset under this torch (API compatibility)
# Every stage runs under `timeout`, capped by what is left of GPU_CHECK_BUDGET (seconds, default 420), logs to
# $OUT/<stage>.log, and a failure never stops the next; $OUT/summary.md is rewritten after each stage. $OUT holds
# at most 8 files (the device tool's limit): env, tests, data, train_vs_ul, loader, families logs and summary.md.
#
#   bench/gpu_check.sh                 # on the GPU machine (python3 = its torch), from the repository root
#   bench/gpu_check.sh --cpu-dry-run   # here: tiny sizes on CPU with .venv (or $PY); CUDA stages fail soft
set -u -o pipefail  # no -e: a failed stage is recorded and the next one runs

cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
if [[ "${1:-}" == "--cpu-dry-run" || "${GPU_CHECK_DRY:-0}" == "1" ]]; then DRY=1; fi
export OUT=${OUT:-/tmp/gpu_check_out}
export GPU_CHECK_WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
WORK=$GPU_CHECK_WORK
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
DEFAULT_BUDGET=420
((DRY)) && DEFAULT_BUDGET=900  # the dry run shares 2 busy cores
BUDGET=${GPU_CHECK_BUDGET:-$DEFAULT_BUDGET}
RESERVE=10  # seconds kept for the last summary
START=$(date +%s)
DEADLINE=$((START + BUDGET))
export GPU_CHECK_START=$START GPU_CHECK_COMMAND="bench/gpu_check.sh $*"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 YOLO_OFFLINE=1 YOLO_CONFIG_DIR=$WORK/yolo-config
export MPLCONFIGDIR=$WORK/mpl TQDM_MININTERVAL=5

if ((DRY)); then
  export GPU_CHECK_MODE="cpu dry run"
  PY=${PY:-$REPO/.venv/bin/python}
  DEVICE=cpu SPECIES=4 PER_SPECIES=10 SIZE_ARGS="--image-width 128 160 --image-height 96 128"
  IMG=128 BATCH=8 EPOCHS=1 WORKERS=2 THREADS=2 VAL_IMAGES=10 LOADER_WORKERS="2" LOADER_BATCHES=3
  PIN="" RUN_TIMEOUT=240 FAMILY_BATCH="train.batch_size=8" FAMILY_CAP=150 NICE="nice -n 10"
else
  export GPU_CHECK_MODE="GPU"
  PY=${PY:-python3}
  # 20 species x 200 = 4,000 images (2,000 train / 2,000 test), ~12 ms each on one core: in the background
  DEVICE=cuda SPECIES=20 PER_SPECIES=${GPU_CHECK_PER_SPECIES:-200} SIZE_ARGS=""
  IMG=640 BATCH=64 EPOCHS=3 WORKERS=8 THREADS=8 VAL_IMAGES=500 LOADER_WORKERS="8 15" LOADER_BATCHES=15
  PIN="--pin-memory" RUN_TIMEOUT=80 FAMILY_BATCH="" FAMILY_CAP=75 NICE=""
fi
DATA=$WORK/synth
YOLO=$WORK/yolo

log() { echo "[$(date +%H:%M:%S) +$(($(date +%s) - START))s] $*"; }
now_ms() { date +%s%3N; }
secs_since() {  # secs_since T0_MS -> seconds with 3 decimals
  local ms=$(($(now_ms) - $1))
  printf "%d.%03d" $((ms / 1000)) $((ms % 1000))
}

summary() {  # the summary so far; if Python itself is broken, at least the stage lines
  $PY bench/gpu_check.py summary 2>>"$OUT/env.log" || echo "- $*" >>"$OUT/summary.md"
}

# run_stage NAME LOGFILE CAP COMMAND...: runs COMMAND under timeout min(CAP, time left), appends to $OUT/LOGFILE,
# records the status (ok / failed rc N / timeout / skipped); returns the command's exit status.
LAST_SECONDS=0
run_stage() {
  local name=$1 logfile=$OUT/$2 cap=$3
  shift 3
  local left=$((DEADLINE - $(date +%s) - RESERVE))
  local limit=$((cap < left ? cap : left))
  LAST_SECONDS=0
  if ((limit < 5)); then
    log "$name: skipped, ${left}s left" | tee -a "$logfile"
    $PY bench/gpu_check.py stage "$name" "skipped (no time left)" 0 "$*"
    summary "$name skipped"
    return 125
  fi
  log "$name (timeout ${limit}s): $*" | tee -a "$logfile"
  local t0 rc status
  t0=$(now_ms)
  timeout -k 5 "$limit" "$@" >>"$logfile" 2>&1
  rc=$?
  LAST_SECONDS=$(secs_since "$t0")
  case $rc in
    0) status=ok ;;
    124 | 137) status="timeout (${limit}s)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  log "$name: $status after ${LAST_SECONDS}s" | tee -a "$logfile"
  $PY bench/gpu_check.py stage "$name" "$status" "$LAST_SECONDS" "$*" || echo "$name $status" >>"$OUT/summary.md"
  summary "$name $status"
  return $rc
}

# ---------------------------------------------------------------------------------------------------------------------
# 1. Environment and install
# ---------------------------------------------------------------------------------------------------------------------
{
  log "mode: $GPU_CHECK_MODE, budget ${BUDGET}s, repo $REPO, python $PY"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  echo "CPUs: $(nproc)"; free -g 2>/dev/null | head -2; df -h /tmp 2>/dev/null | tail -1
} >>"$OUT/env.log" 2>&1
if ((DRY)); then
  # polars is not carried (54 MB of wheel): hide it here too, so the dry run shows Ultralytics trains without it
  mkdir -p "$WORK/no-polars/polars"
  echo 'raise ImportError("polars is not carried to the GPU machine (bench/gpu_check.sh)")' \
    >"$WORK/no-polars/polars/__init__.py"
  export PYTHONPATH=$WORK/no-polars:$REPO${PYTHONPATH:+:$PYTHONPATH}
  log "dry run: no wheel install (the .venv has every package but polars, hidden)" >>"$OUT/env.log"
else
  ls .whl/*.whl >>"$OUT/env.log" 2>&1
  run_stage install env.log 90 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$REPO
  # the carried wheels must not shadow the machine's own numpy / torch / opencv
  ls /tmp/site >>"$OUT/env.log" 2>&1
fi
run_stage env env.log 90 $PY bench/gpu_check.py env

# ---------------------------------------------------------------------------------------------------------------------
# 2 + 3. Data generation in the background (CPU) while the CUDA tests run (GPU)
# ---------------------------------------------------------------------------------------------------------------------
GEN_CMD="$PY tools/make_synth_cub.py --out $DATA --species $SPECIES --per-species $PER_SPECIES $SIZE_ARGS"
GEN_LIMIT=$((DEADLINE - $(date +%s) - RESERVE))
GEN_LIMIT=$((GEN_LIMIT < 240 ? GEN_LIMIT : 240))
log "generate (background, timeout ${GEN_LIMIT}s): $GEN_CMD" >>"$OUT/data.log"
GEN_T0=$(now_ms)
timeout -k 5 $GEN_LIMIT $NICE $GEN_CMD >>"$OUT/data.log" 2>&1 &
GEN_PID=$!  # the timeout process: it passes a kill on to the generator

run_stage tests tests.log 150 $PY -m pytest -q -s -rA -p no:cacheprovider tests/test_cuda.py tests/test_fp16_fallback.py
$PY bench/gpu_check.py tests "$OUT/tests.log" "pytest -q -s tests/test_cuda.py tests/test_fp16_fallback.py" --stage tests
summary tests

log "generate: waiting for the generator" >>"$OUT/data.log"
while kill -0 $GEN_PID 2>/dev/null && (($(date +%s) < DEADLINE - RESERVE)); do sleep 0.2; done
GEN_S=$(secs_since "$GEN_T0")
kill $GEN_PID 2>/dev/null  # only if it is still running at the deadline
wait $GEN_PID
GEN_RC=$?
case $GEN_RC in 0) GEN_STATUS=ok ;; 124 | 137 | 143) GEN_STATUS="timeout" ;; *) GEN_STATUS="failed (exit $GEN_RC)" ;; esac
log "generate: $GEN_STATUS after ${GEN_S}s" >>"$OUT/data.log"
$PY bench/gpu_check.py stage generate "$GEN_STATUS" "$GEN_S" "$GEN_CMD"
$PY bench/gpu_check.py data "$DATA" "$OUT/data.log" "$GEN_CMD"
run_stage export data.log 60 $PY bench/gpu_check.py export "$DATA" "$YOLO" --val-images $VAL_IMAGES
DATA_YAML=$YOLO/data_val$VAL_IMAGES.yaml  # the val subset (bench_train_vs_ultralytics.write_val_subset)
[[ -f "$DATA_YAML" ]] || DATA_YAML=$YOLO/data.yaml
log "data yaml: $DATA_YAML" >>"$OUT/data.log"

# ---------------------------------------------------------------------------------------------------------------------
# 4. YOLOv8n: plugdet beside Ultralytics, same images, same epochs
# ---------------------------------------------------------------------------------------------------------------------
BENCH=(bench/bench_train_vs_ultralytics.py --device $DEVICE --data-yaml "$DATA_YAML" --work "$WORK/tvu"
  --img-size $IMG --batch $BATCH --epochs $EPOCHS --seeds 0 --workers $WORKERS --threads $THREADS --cache none
  --variants amp --eval-backend faster --eval-workers $WORKERS --run-timeout $RUN_TIMEOUT --json "$WORK/tvu.json")
run_stage train_vs_ultralytics train_vs_ul.log 200 $PY "${BENCH[@]}"
for f in "$WORK"/tvu/logs/*.log; do  # each training run's own log, after the bench's output
  [[ -f $f ]] && { echo "----- $f (last 60 lines)"; tail -60 "$f"; } >>"$OUT/train_vs_ul.log"
done
[[ -f "$WORK/tvu.json" ]] && $PY bench/gpu_check.py bench "$WORK/tvu.json" "python ${BENCH[*]}"
summary train_vs_ultralytics

# ---------------------------------------------------------------------------------------------------------------------
# 5. The loader alone (same batch, size, workers as 4; disk, as data.cache=false there)
# ---------------------------------------------------------------------------------------------------------------------
LOADER=(bench/bench_loader.py --root "$DATA" --img-size $IMG --batch $BATCH --batches $LOADER_BATCHES --workers
  $LOADER_WORKERS --sources disk $PIN --json "$WORK/loader.json")
run_stage loader loader.log 45 $PY "${LOADER[@]}"
[[ -f "$WORK/loader.json" ]] && $PY bench/gpu_check.py loader "$WORK/loader.json" "python ${LOADER[*]}"
summary loader

# ---------------------------------------------------------------------------------------------------------------------
# 6. One epoch of each family's GPU config on the same data (bird labels, val subset), eval at the end
# ---------------------------------------------------------------------------------------------------------------------
for family in yolov8n faster_rcnn retinanet fcos yolo11n resnet50; do
  args=(tools/train_det.py configs/det/${family}_cub.yaml data.format=yolo "data.yaml=$DATA_YAML"
    data.labels=bird model.backbone_weights=null train.epochs=1 train.close_mosaic=0 eval.interval=1 eval.backend=faster
    "output_dir=$WORK/families/$family" train.device=$DEVICE data.img_size=$IMG $FAMILY_BATCH)
  ((DRY)) && args+=(train.workers=$WORKERS train.threads=$THREADS)
  run_stage "family $family" families.log $FAMILY_CAP $PY "${args[@]}"
  (($? != 125)) && $PY bench/gpu_check.py family "$family" "$WORK/families/$family" "$LAST_SECONDS" "python ${args[*]}"
  summary "family $family"
done

# ---------------------------------------------------------------------------------------------------------------------
# 7. With the time left: CPU tests of the model, loss and data code under this torch / torchvision
# ---------------------------------------------------------------------------------------------------------------------
if ((!DRY)); then
  COMPAT=(-m pytest -q -p no:cacheprovider -m "not slow")
  for name in layers csp csp11 neck head loss assign boxes postprocess transforms mosaic torchvision_heads; do
    [[ -f tests/test_$name.py ]] && COMPAT+=(tests/test_$name.py)  # a file renamed since must not stop the rest
  done
  run_stage compat tests.log 120 $PY "${COMPAT[@]}"
  (($? != 125)) && $PY bench/gpu_check.py tests "$OUT/tests.log" "python ${COMPAT[*]}" --stage compat
fi

log "done: $(($(date +%s) - START))s of ${BUDGET}s" | tee -a "$OUT/env.log"
ls -la "$OUT" >>"$OUT/env.log"
$PY bench/gpu_check.py summary --print || cat "$OUT/summary.md"
exit 0

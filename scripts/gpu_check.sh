#!/usr/bin/env bash
# One-command GPU check (issue 11 item 7), meant to finish in under 5 minutes on one GPU with DALI:
#   1. benchmark clips: 10 s, 426x320 ("320p"), H.264 with B-frames, GOP 16 and GOP 250
#      (scripts/make_bench_clips.py; needs ffmpeg, else carry prebuilt clips and set CLIPS=folder);
#   2. the gpu-marked tests (pytest -m gpu);
#   3. the profiler with --data.device=gpu on both clip sets, batch 32, TSN 8x224, with data.trim on
#      and off when the config has a `trim:` key (added by the GOP-trimming work), else as it is;
#   4. one epoch of TSM-R50 8x224, bf16, channels-last (configs/tsm_k400.yaml, no pretrained weights)
#      on the GOP 16 clips, with GPU memory sampled by nvidia-smi;
#   5. the same model's step rate on synthetic data (scripts/gpu_check_report.py synthetic);
# and prints one table (clips/s, decoded frames per kept frame, GPU memory, data-wait share, speed vs
# synthetic data); everything lands in $OUT/gpu_check (summary.json, prof_*.json, train/metrics.jsonl).
#
# Usage:  bash scripts/gpu_check.sh                      # on the GPU machine
#         bash scripts/gpu_check.sh --data.device=cpu    # CPU dry run: VP9 clips, tiny sizes, no GPU
# Extra dotted overrides are passed to the profiler and to train.py. PY picks the interpreter
# (default python3), OUT the output root (default ./gpu_check_out; the lent machine sets $OUT).
#
# Getting DALI onto a lent GPU machine (no package registry there; see ../shared/gpu/README.md): from
# the project root here, `bash ../shared/gpu/make_parts.sh` splits the DALI wheel into 48 MiB parts
# under .gpu_carry/; one `run` call per part copies it to /root/dali (carry=[".gpu_carry/pNN"]), back
# to back while the machine is warm; one more call carrying .gpu_carry/deps joins, checks and installs
# them into /root/site; then every call starts with `export PYTHONPATH=/root/site:$PWD;` and runs
# `bash scripts/gpu_check.sh`. ffmpeg may be missing there: then make the clips here
# (scripts/make_bench_clips.py) and carry them, with CLIPS pointing at them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEVICE=gpu
for arg in "$@"; do
  case $arg in --data.device=*) DEVICE=${arg#*=} ;; esac
done
ROOT=${OUT:-gpu_check_out}/gpu_check
CLIPS=${CLIPS:-$ROOT/clips}
mkdir -p "$ROOT" "$CLIPS"
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

if [ "$DEVICE" = gpu ]; then
  SETS=("h264_16 h264 16" "h264_250 h264 250")
  NUM=(256 128); SIZE=426x320; SECONDS_=10
  BATCH=32; INPUT=224; SCALE=256; BATCHES=12; THREADS=8; LOG_EVERY=2
  ROUTE=(); MODEL=(); TRAIN_DATA=()
else  # the CPU twin: DALI's CPU video decoder (VP9) stands in for NVDEC, everything tiny
  SETS=("vp9_16 vp9 16")
  NUM=(8); SIZE=96x64; SECONDS_=3
  BATCH=2; INPUT=32; SCALE=40; BATCHES=2; THREADS=1; LOG_EVERY=1
  ROUTE=(--decoders dali); MODEL=(--model.debug=true); TRAIN_DATA=(--data.cpu_decoder=dali --train.threads=1)
fi

"$PY" -c "import nvidia.dali as d; print('DALI', d.__version__)" ||
  { echo "error: DALI is not importable with $PY (see the header of $0 for bringing it over)"; exit 2; }

step "clips under $CLIPS"
for k in "${!SETS[@]}"; do
  read -r name codec gop <<< "${SETS[$k]}"
  if [ ! -s "$CLIPS/$name/train.txt" ]; then
    "$PY" scripts/make_bench_clips.py "$CLIPS/$name" --codec "$codec" --gop "$gop" --num "${NUM[$k]}" \
      --size "$SIZE" --seconds "$SECONDS_"
  fi
done

step "gpu-marked tests"
"$PY" -m pytest -m gpu tests -q -p no:cacheprovider

TRIMS=(as-configured)
if "$PY" train.py configs/demo.yaml --print-config | grep -qE '^[[:space:]]+trim:'; then
  TRIMS=(on off)
fi
COMMON=(--data.device="$DEVICE" --data.batch_size="$BATCH" --data.input_size="$INPUT" --data.scale_size="$SCALE"
        --data.num_segments=8 --model.num_segments=8)
for spec in "${SETS[@]}"; do
  read -r name _ _ <<< "$spec"
  for trim in "${TRIMS[@]}"; do
    step "profiler: $name, trim $trim"
    trim_arg=()
    [ "$trim" = as-configured ] || trim_arg=(--data.trim="$trim")
    "$PY" -m dali_pipes.profile configs/demo.yaml "${ROUTE[@]}" --batches "$BATCHES" --warmup 2 \
      --threads "$THREADS" --json "$ROOT/prof_${name}_trim-$trim.json" "${COMMON[@]}" \
      --data.train_list="$CLIPS/$name/train.txt" --data.flip=on "--data.crop_scales=[1.0,0.875,0.75,0.66]" \
      "${trim_arg[@]}" "$@"
  done
done

read -r first _ _ <<< "${SETS[0]}"
TRAIN=(--data.train_list="$CLIPS/$first/train.txt" --data.val_list="$CLIPS/$first/train.txt"
       --data.num_workers="$THREADS" --data.num_threads="$THREADS" --model.num_classes=8 '--model.pretrained=""'
       --train.amp=bf16 --train.channels_last=true "${MODEL[@]}")
step "train.py: one epoch of TSM-R50 (dry run: debug size) 8x$INPUT bf16 channels-last on $first"
rm -rf "$ROOT/train" "$ROOT/gpu_mem_mib.txt"
MEM_PID=""
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$ROOT/gpu_mem_mib.txt" &
  MEM_PID=$!
fi
"$PY" train.py configs/tsm_k400.yaml "${COMMON[@]}" "${TRAIN[@]}" "${TRAIN_DATA[@]}" --train.epochs=1 \
  --train.eval_every=0 --train.log_every="$LOG_EVERY" --train.progress=false --train.out_dir="$ROOT/train" "$@"
[ -z "$MEM_PID" ] || kill "$MEM_PID"

step "the same model on synthetic data"
"$PY" scripts/gpu_check_report.py synthetic "$ROOT/synthetic.json" configs/tsm_k400.yaml "${COMMON[@]}" \
  "${TRAIN[@]}" "${TRAIN_DATA[@]}" "$@" > /dev/null

step "summary"
"$PY" scripts/gpu_check_report.py table "$ROOT"

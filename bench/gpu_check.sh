#!/usr/bin/env bash
# One short GPU check for a single H100/H200-class card (issue 7), everything on the same card in one run:
#   (a) images/s of our peer's local training step, ConvNeXt-T batch 128 (bf16 autocast, channels_last, the
#       swarm's AdamW), against a plain timm loop at the same settings (goal: >= 1.1x);
#   (b) peak memory of ConvNeXt-T batch 64 with AdamW / bitsandbytes AdamW8bit, with and without gradient
#       checkpointing, run under an allocator cap of 8 GB minus the CUDA context (goal: fits 8 GB);
#   (c) our checkpoints (model/checkpoint.py) loaded by timm.create_model("local-dir:..."), logits compared;
#   (d) bench/depth_memory.py on the card: activation memory at depth 16 / 256 / 1024, with and without
#       checkpointing.
# Needs torch with CUDA; timm, bitsandbytes and hivemind are optional (parts that need a missing one say so
# and are skipped). No network and no install: bench/ imports model/ and peer/ from this checkout.
# Every part runs in its own process under `timeout`, inside an overall budget (BUDGET_S, default 450 s), so
# the script cannot hang and stays under 8 minutes; progress lines are printed as it goes.
#
#   bash bench/gpu_check.sh                      # on the GPU machine, from anywhere in the checkout
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#   DEVICE=cpu SMALL=1 bash bench/gpu_check.sh   # end-to-end dry run on a CPU with tiny shapes (no appending)
# Other knobs: COMPILE=1 (also our step with torch.compile; ~1-2 min more), BUDGET_S, APPEND=0/1,
# OUT (a folder that receives gpu_check.json, gpu_check.md and the log; the run tool's $OUT works as is).
#
# Output: a summary block on stdout; DIR/gpu_check.json + DIR/gpu_check.md (DIR printed at the end, and
# copied to $OUT when set); with a CUDA device, the markdown section is appended to bench/RESULTS.md.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
START=$(date +%s)
BUDGET_S=${BUDGET_S:-450}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
COMPILE=${COMPILE:-0}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python >/dev/null 2>&1; then PY=python
else PY=python3; fi
DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
LOG=$DIR/gpu_check.log
if [ "$DEVICE" = cuda ]; then APPEND=${APPEND:-1}; else APPEND=${APPEND:-0}; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1

say() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

declare -A PART_STATUS
# run_part NAME MAX_SECONDS MIN_SECONDS CMD...: runs under timeout min(MAX, budget left - 20 s for the report)
run_part() {
  local name=$1 max=$2 min=$3; shift 3
  local budget=$(( $(left) - 20 ))
  local limit=$(( budget < max ? budget : max ))
  if [ "$limit" -lt "$min" ]; then
    say "skip $name: ${budget}s of the budget left, it needs at least ${min}s"
    PART_STATUS[$name]="skipped (budget)"
    return
  fi
  say "start $name (timeout ${limit}s)"
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  case $rc in
    0) PART_STATUS[$name]="ok ${took}s" ;;
    124|137) PART_STATUS[$name]="timed out after ${took}s" ;;
    *) PART_STATUS[$name]="failed rc=$rc after ${took}s" ;;
  esac
  say "end $name: ${PART_STATUS[$name]}"
}

say "device=$DEVICE small=$SMALL compile=$COMPILE budget=${BUDGET_S}s python=$(command -v "$PY") results in $DIR"
GPU_NAME=""
if [ "$DEVICE" = cuda ]; then
  if GPU_NAME=$(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n1); then
    say "nvidia-smi: $GPU_NAME"
  else
    say "nvidia-smi failed: $GPU_NAME"; GPU_NAME=""
  fi
fi
if ! timeout 120 "$PY" -c "import torch, sys; sys.exit(0 if '$DEVICE' != 'cuda' or torch.cuda.is_available() else 3)" 2>&1 | tee -a "$LOG"; then
  say "torch does not import, or sees no CUDA device; DEVICE=cpu SMALL=1 runs the dry run on a CPU"
  exit 3
fi
for mod in timm bitsandbytes hivemind; do
  if timeout 60 "$PY" -c "import $mod" >/dev/null 2>&1; then say "$mod: importable"
  else say "$mod: not importable (the parts that need it report it and skip)"; fi
done

STEP=(bench/gpu_step.py --device "$DEVICE")
DEPTH=(bench/depth_memory.py --device "$DEVICE" --no-append)
if [ "$SMALL" = 1 ]; then
  STEP+=(--image-size 32)
  TP=(--batch 4 --steps 2 --warmup 1 --rounds 2)
  MEM=(--batch 4 --steps 2)
  DEPTH+=(--depths 8 16 --no-preset --batch 2 --image-size 32 --repeats 1)
else
  TP=()
  MEM=()
  DEPTH+=(--no-preset --batch 8 --image-size 64 --repeats 3)
fi
[ "$COMPILE" = 1 ] && TP+=(--compile)

run_part env 90 10 "$PY" "${STEP[@]}" env --out "$DIR/env.json"
run_part throughput $([ "$COMPILE" = 1 ] && echo 300 || echo 150) 40 "$PY" "${STEP[@]}" throughput --out "$DIR/throughput.json" "${TP[@]}"
run_part memory 120 30 "$PY" "${STEP[@]}" memory --out "$DIR/memory.json" "${MEM[@]}"
run_part timm-load 90 20 "$PY" "${STEP[@]}" timm-load --out "$DIR/timm.json"
run_part depth 180 40 "$PY" "${DEPTH[@]}" --json "$DIR/depth.json" --timeout 120

{
  printf '{"nvidia_smi": "%s", "command": "%s", "seconds": %s, "parts": {' \
    "${GPU_NAME//\"/}" "DEVICE=$DEVICE SMALL=$SMALL COMPILE=$COMPILE bash bench/gpu_check.sh" "$(( $(date +%s) - START ))"
  sep=""
  for name in env throughput memory timm-load depth; do
    printf '%s"%s": "%s"' "$sep" "$name" "${PART_STATUS[$name]:-not run}"; sep=", "
  done
  printf '}}\n'
} > "$DIR/status.json"

REPORT=("$PY" bench/gpu_step.py report --dir "$DIR")
[ "$APPEND" = 1 ] && REPORT+=(--append)
timeout 60 "${REPORT[@]}" 2>&1 | tee -a "$LOG"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$DIR"/*.json "$DIR"/*.md "$LOG" "$OUT"/ 2>/dev/null && say "copied the results to $OUT"
fi
say "done in $(( $(date +%s) - START ))s; results in $DIR"

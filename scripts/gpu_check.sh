#!/usr/bin/env bash
# GPU check for the fast WaveFT training path (issue 3), the memory table (issue 14) and the trainer on a GPU: one
# command, one CUDA GPU, about 5 minutes (the parts' limits add up to 9).
#
#   1. benchmarks.layer --check: ours vs peft's reference on the GPU (fp32 to 1e-4, and ours under bf16 autocast), the
#      sampled-product kernels timed there (gather / csr = torch.sparse.sampled_addmm / dense), then the three SDXL
#      attention shapes: frozen, reference, LoRA and ours interleaved, bf16 weights under bf16 autocast.
#   2. The demo (configs/demo.yaml) as a GPU user runs it: bf16 weights, bf16 mixed precision, through accelerate on
#      the GPU; then `evaluate` (the judge's metrics) and `sample` on the GPU (its default fp16) with --compare-base.
#   3. benchmarks.step: one full training step of the SDXL-base UNet architecture (random weights), 128x128 latents,
#      batch 2, bf16 weights under bf16 autocast: ours vs reference vs LoRA, interleaved, with peak memory.
#   4. benchmarks.memory --device cuda: the memory table of BENCHMARKS.md §3 measured for real
#      (torch.cuda.max_memory_allocated, plus the allocator's reserve and the CUDA context) for ours and LoRA.
#   5. benchmarks.profile --device cuda: per layer step, wall time against the GPU's busy time and kernels launched.
#
# A part that fails or runs out of time does not stop the others (a GPU is lent rarely); the script then exits 1 and
# names it. Everything printed goes to gpu_check.log; with the JSON files and two grids that is 8 files, what the lent
# machine hands back at most. BENCHMARKS.md §6 has the first run's figures (an H200, 252 s without part 5).
#
# Usage: scripts/gpu_check.sh [output folder, default: $OUT or gpu_check_out]   (PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5  # fewer bar lines (the training bar still prints every step)
export PYTHON=${PYTHON:-python}
export OUT_DIR=${1:-${OUT:-gpu_check_out}}
export WORK=$(mktemp -d)  # the demo's run folder and class images (large; not copied back)
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
failed=()

part() {  # part NAME SECONDS COMMAND...: one check, its output to the screen and the log; a failure is remembered
  local name=$1 seconds=$2 start=$SECONDS rc
  shift 2
  echo "=== $name (limit ${seconds} s)" | tee -a "$LOG"
  timeout -k 10 "$seconds" "$@" 2>&1 | tr '\r' '\n' | grep --line-buffered -v '^\s*$' | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || failed+=("$name")
}

part environment 40 "$PYTHON" -c '
import torch, diffusers, peft, transformers, accelerate
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, diffusers "
      f"{diffusers.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
      f"peft {peft.__version__}")'

part layer 60 "$PYTHON" -m benchmarks.layer --device cuda --check --rounds 30 --json "$OUT_DIR/layer_cuda.json"

demo() {
  "$PYTHON" -m waveft_train --config configs/demo.yaml --set model.dtype=bf16 --set train.mixed_precision=bf16 \
      --set output.dir="$WORK/demo" --set prior.class_dir="$WORK/class-images" || return 1
  cat "$WORK/demo/summary.json"
  cp "$WORK/demo/samples/$(ls "$WORK/demo/samples" | tail -1)" "$OUT_DIR/demo_grid.png" || return 1
  "$PYTHON" -m waveft_train evaluate --adapter "$WORK/demo/adapter" --out "$OUT_DIR/demo_metrics.json" || return 1
  "$PYTHON" -m waveft_train sample --adapter "$WORK/demo/adapter" --device cuda --compare-base -n 4 \
      -p "a photo of sks ball on the beach" -p "a photo of sks ball in the snow" -p "a photo of a ball" \
      --out "$OUT_DIR/demo_sample_fp16.png"
}
export -f demo
part demo 180 bash -c demo

part step 90 "$PYTHON" -m benchmarks.step --model sdxl --device cuda --latent 128 --batch 2 --rounds 5 --warmup 2 \
    --json "$OUT_DIR/step_sdxl_cuda.json"

part memory 120 "$PYTHON" -m benchmarks.memory --device cuda --methods ours lora --json "$OUT_DIR/memory_cuda.json"

part profile 60 "$PYTHON" -m benchmarks.profile --device cuda --json "$OUT_DIR/profile_cuda.json"

rm -rf "$WORK"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}; results in $OUT_DIR" | tee -a "$LOG"
  exit 1
fi
echo "gpu_check: done; results in $OUT_DIR" | tee -a "$LOG"

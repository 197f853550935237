#!/usr/bin/env bash
# GPU check (issues 3, 14, 35): the fast WaveFT training path against LoRA and peft's reference, eager and compiled,
# the memory table, and a training step that never waits for the device. One command, one CUDA GPU, under 8 minutes
# (the parts' limits add up to 8 min 50 s; a part that runs out of time is named and the rest still run).
#
#   1. benchmarks.layer --check: ours vs peft's reference on the GPU (fp32 to 1e-4, and ours under bf16 autocast), the
#      sampled-product kernels timed there (gather / csr = torch.sparse.sampled_addmm / dense), then the three SDXL
#      attention shapes: frozen, reference, LoRA and ours interleaved, bf16 weights under bf16 autocast.
#   2. benchmarks.step: one full training step of the SDXL-base UNet architecture (random weights), 128x128 latents,
#      batch 2, bf16 weights under bf16 autocast: ours vs reference vs LoRA, interleaved, with peak memory.
#   3. The same step under torch.compile (what train.compile does): ours vs LoRA, and the first step's seconds
#      (compilation included).
#   4. benchmarks.memory --device cuda: the recipe's training step (BENCHMARKS.md §3) measured for real for ours and
#      LoRA.
#   5. scripts.sync_check: three steps of the real trainer on the toy model with torch.cuda.set_sync_debug_mode
#      ("error") around each step.
#   6. benchmarks.profile --device cuda: per layer step, wall time against the GPU's busy time and kernels launched.
#
# A part that fails or runs out of time does not stop the others (a GPU is lent rarely); the script then exits 1 and
# names it. Everything printed goes to gpu_check.log, every part's JSON into gpu_check.json (and its own file).
#
# Usage: scripts/gpu_check.sh [output folder, default: $OUT or gpu_check_out]   (PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5  # fewer bar lines (the training bar still prints every step)
export PYTHON=${PYTHON:-python}
export OUT_DIR=${1:-${OUT:-gpu_check_out}}
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

part step 90 "$PYTHON" -m benchmarks.step --model sdxl --device cuda --latent 128 --batch 2 --rounds 5 --warmup 2 \
    --json "$OUT_DIR/step_sdxl_cuda.json"

part step_compiled 210 "$PYTHON" -m benchmarks.step --model sdxl --device cuda --latent 128 --batch 2 --rounds 5 \
    --warmup 2 --compile --methods ours lora --no-memory --json "$OUT_DIR/step_sdxl_cuda_compiled.json"

part memory 120 "$PYTHON" -m benchmarks.memory --device cuda --methods ours lora --json "$OUT_DIR/memory_cuda.json"

part sync 60 "$PYTHON" -m scripts.sync_check --steps 3

part profile 60 "$PYTHON" -m benchmarks.profile --device cuda --methods frozen lora ours ours-gather ours-csr \
    --json "$OUT_DIR/profile_cuda.json"

"$PYTHON" - "$OUT_DIR" <<'PY'  # the parts' JSON files in one
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*.json")) if path.name != "gpu_check.json"}
(out / "gpu_check.json").write_text(json.dumps(parts, indent=2) + "\n")
PY

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}; results in $OUT_DIR" | tee -a "$LOG"
  exit 1
fi
echo "gpu_check: done; results in $OUT_DIR" | tee -a "$LOG"

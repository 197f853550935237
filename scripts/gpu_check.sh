#!/usr/bin/env bash
# GPU check for the fast WaveFT training path (issue 3) and the memory table (issue 14): one command, one CUDA GPU,
# about 5-10 minutes.
#
#   1. benchmarks.layer --check: ours vs peft's reference on the GPU (fp32 to 1e-4, and ours under bf16 autocast), the
#      sampled-product kernels timed there (gather / csr = torch.sparse.sampled_addmm / dense), then the three SDXL
#      attention shapes: frozen, reference, LoRA and ours interleaved, bf16 weights under bf16 autocast.
#   2. benchmarks.step: one full training step of the SDXL-base UNet architecture (random weights), 128x128 latents,
#      batch 2, bf16 weights under bf16 autocast: ours vs reference vs LoRA, interleaved, with peak memory.
#   3. benchmarks.memory --device cuda: the memory table of BENCHMARKS.md §3 measured for real
#      (torch.cuda.max_memory_allocated, plus the allocator's reserve and the device's use) for ours and LoRA.
#
# Usage: scripts/gpu_check.sh [output folder, default: $OUT or gpu_check_out]   (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python}
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"

"$PYTHON" - <<'EOF' | tee "$OUT_DIR/environment.txt"
import torch, diffusers, peft
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"diffusers {diffusers.__version__}, peft {peft.__version__}")
EOF

timeout 150 "$PYTHON" -m benchmarks.layer --device cuda --check --rounds 30 \
    --json "$OUT_DIR/layer_cuda.json" 2>&1 | tee "$OUT_DIR/layer_cuda.txt"

timeout 240 "$PYTHON" -m benchmarks.step --model sdxl --device cuda --latent 128 --batch 2 --rounds 5 --warmup 2 \
    --json "$OUT_DIR/step_sdxl_cuda.json" 2>&1 | tee "$OUT_DIR/step_sdxl_cuda.txt"

timeout 300 "$PYTHON" -m benchmarks.memory --device cuda --methods ours lora \
    --json "$OUT_DIR/memory_cuda.json" 2>&1 | tee "$OUT_DIR/memory_cuda.txt"

echo "gpu_check: done; results in $OUT_DIR"

#!/usr/bin/env bash
# GPU benchmark: GPT-2 124M packed bf16 training (kubetune train stage) vs the course
# template (HF Trainer, padding to 512, batch 8) on one NVIDIA GPU; tokens/s and MFU.
#
#   bash bench/gpu.sh              # on the GPU machine, from a copy of the repo (no network)
#   bash bench/gpu.sh --dry-run    # anywhere: CPU, tiny model, a few steps
#
# Writes $OUT/gpu.json (or bench/results/gpu.json) and prints a table. Installs nothing:
# torch, transformers and accelerate must already be there. Stops itself after 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="core:trainer:operator:.${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 KUBETUNE_METRICS_PORT=0
export TOKENIZERS_PARALLELISM=true
PY="${PYTHON:-python}"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
"$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
exec timeout --signal=TERM 470 "$PY" -m bench.gpu "$@"

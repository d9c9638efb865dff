#!/usr/bin/env bash
# The GPU check of the CUDA path, for a machine with an NVIDIA GPU; about 5-8 minutes.
#
#   bench/gpu_check.sh [OUT_DIR]        (default: gpu_check_out; OUT_DIR=$OUT on the device tool)
#
# 1. what the machine has (nvidia-smi, torch, triton, flashinfer);
# 2. the GPU-marked tests (tests/test_gpu.py): each attention backend (torch, triton, flashinfer)
#    against the torch reference on the GPU, the engine against transformers in float32 with the
#    Triton MoE kernel wired in, EAGLE3 lossless per backend, seeded sampling reproducible, images;
#    TP 2 when two GPUs are visible (none yet: --tp is not built);
# 3. a short head-to-head on the embedded SmolLM2: transformers bf16 against specdec bf16, plain
#    and EAGLE3 (2,1,3), on the GPU.
# Results go to OUT_DIR (text, JUnit XML and JSON); record them in docs/PERFORMANCE.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
PY=.venv/bin/python
if [ ! -x "$PY" ]; then  # a bare machine: install the checkout into the system Python, no downloads
    PY=$(command -v python3)
    "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT_DIR/install.txt" 2>&1 || {
        echo "gpu_check: could not install the checkout (see $OUT_DIR/install.txt)"; exit 2; }
fi
export TRITON_INTERPRET=0
status=0
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
    "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
    "$PY" -c "import flashinfer; print('flashinfer', flashinfer.__version__)" || echo "flashinfer: not importable"
} 2>&1 | tee "$OUT_DIR/machine.txt"
timeout 420 "$PY" -m pytest tests/test_gpu.py -m gpu -q -rs -p no:cacheprovider \
    --junitxml "$OUT_DIR/gpu_tests.xml" 2>&1 | tee "$OUT_DIR/gpu_tests.txt" || status=1
timeout 180 "$PY" -m specdec.bench.head_to_head --device cuda --dtype bfloat16 --quantization none \
    --num-prompts 4 --max-new-tokens 64 --repeats 1 --trees 2,1,3 --json "$OUT_DIR/head_to_head.json" \
    2>&1 | tee "$OUT_DIR/head_to_head.txt" || status=1
echo "gpu_check: exit $status (results in $OUT_DIR)"
exit $status

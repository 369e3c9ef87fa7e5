#!/usr/bin/env bash
# Training runs on one GPU for the results in bench/results/train_*.md:
#   1. the demo config in bf16;
#   2. the ~125M config with the dense (torch) MLP path: tokens/s and MFU;
#   3. the ~125M config with the `auto` backend: L1 ramps up, nnz/token falls, and layers switch
#      to the hybrid sparse kernels once their nnz/H is under model.sparse_nnz_threshold.
# Usage (from the repo root, wheels for deepspeed & co. in .whl/): bash tools/gpu_train_runs.sh OUT_DIR [STEPS]
# ONLY=name runs just that run (demo_bf16, m125_dense, m125_auto or m125_threshold).
#   4. m125_threshold: as 3 with model.sparse_calibration=false, so layers switch on the nnz
#      threshold alone even where the sparse kernels measure slower (tokens/s after switching).
set -uo pipefail
out=${1:?output folder}; steps=${2:-300}; only=${ONLY:-}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 MEGASPARSE_CACHE=/tmp/megasparse_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
run() {  # name, then megasparse train arguments
  local name=$1; shift
  if [ -n "$only" ] && [ "$only" != "$name" ]; then return; fi
  echo "=== $name"
  timeout 240 python3 -m megasparse.cli train "$@" train.run_dir=/tmp/runs/$name train.progress_bar=false \
    > "$out/$name.log" 2>&1; echo "exit $?" | tee -a "$out/$name.log"
  cp /tmp/runs/$name/metrics.jsonl "$out/$name.metrics.jsonl" 2>/dev/null
  grep -E "^step|^\[valid\]|error|Error" "$out/$name.log" | tail -8
}
run demo_bf16 configs/demo.yaml train.max_steps=200 train.save_interval=1000
run m125_dense configs/125m.yaml train.max_steps=$steps model.mlp_backend=torch train.save_interval=100000 \
  sparsity.schedule=linear sparsity.delay_steps=50 sparsity.ramp_steps=150 sparsity.l1_coeff=0.02
run m125_auto configs/125m.yaml train.max_steps=$steps model.mlp_backend=auto train.save_interval=100000 \
  sparsity.schedule=linear sparsity.delay_steps=50 sparsity.ramp_steps=150 sparsity.l1_coeff=0.02
run m125_threshold configs/125m.yaml train.max_steps=$steps model.mlp_backend=auto train.save_interval=100000 \
  sparsity.schedule=linear sparsity.delay_steps=50 sparsity.ramp_steps=150 sparsity.l1_coeff=0.02 \
  model.sparse_calibration=false

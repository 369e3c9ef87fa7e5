#!/usr/bin/env bash
# Multi-GPU validation on one host (issue 9's 2-GPU half), 0.5B shape (8 layers, D=2048,
# H=5632, 32 heads, seq 2048), bf16, ZeRO-1, the bundled text, same global batch (8 x 2048):
#   r1_tp1     1 GPU  tp=1 dp=1 (2 micro-batches of 4 accumulated)
#   r2_tp2     2 GPUs tp=2 dp=1 (NCCL tensor parallel; loss should track r1 within bf16)
#   r3_dp2     2 GPUs tp=1 dp=2 (data parallel; per-GPU micro-batch as r1: weak scaling)
#   r4_resume  r2 again from its step-6 checkpoint (losses of steps 7-12 should equal r2's)
# Usage (repo root, wheels in .whl/): bash tools/gpu_multi_runs.sh OUT_DIR [PART]
# PART: a (r1, r2), b (r3, r4: needs a's r2 checkpoint in /tmp/runs), or ab (default).
set -uo pipefail
out=${1:?output folder}; part=${2:-ab}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
  export PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 MEGASPARSE_CACHE=/tmp/megasparse_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
printf 'NCCL_NVLS_ENABLE=0\nTORCH_SYMM_MEM_DISABLE_MULTICAST=1\nNVSHMEM_DISABLE_NVLS=1\nPYTHONPATH=%s\n' "$PYTHONPATH" > .deepspeed_env
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
shape="model.d_model=2048 model.n_layers=8 model.n_heads=32 model.n_kv_heads=32 model.ffn_hidden=5632
 model.max_seq_len=2048 data.seq_len=2048 parallel.zero_stage=1 train.global_batch_size=8
 train.micro_batch_size=4 train.log_interval=1 train.eval_interval=100000 train.progress_bar=false
 optim.warmup_steps=5 model.mlp_backend=torch sparsity.l1_coeff=0.01"
run() {  # name, gpus, then overrides
  local name=$1 gpus=$2; shift 2
  echo "=== $name ($gpus GPU)"
  timeout 170 bash launch/train.sh --num_gpus "$gpus" configs/125m.yaml $shape "$@" > "$out/$name.log" 2>&1
  echo "exit $?"
  grep -E "^step" "$out/$name.log" | cut -d'|' -f1,2 | tr '\n' ';' | cut -c1-700; echo
  grep -E "^step" "$out/$name.log" | tail -1
  grep -iE "error|Traceback" "$out/$name.log" | head -5
}
if [[ $part == *a* ]]; then
  run r1_tp1 1 train.max_steps=12 train.save_interval=100000 train.run_dir=/tmp/runs/r1 parallel.tp=1
  run r2_tp2 2 train.max_steps=12 train.save_interval=6 train.run_dir=/tmp/runs/r2 parallel.tp=2
  cp /tmp/runs/r1/metrics.jsonl "$out/r1_tp1.metrics.jsonl"; cp /tmp/runs/r2/metrics.jsonl "$out/r2_tp2.metrics.jsonl"
fi
if [[ $part == *b* ]]; then
  run r3_dp2 2 train.max_steps=12 train.save_interval=100000 train.run_dir=/tmp/runs/r3 parallel.tp=1
  cp /tmp/runs/r3/metrics.jsonl "$out/r3_dp2.metrics.jsonl"
  if [ -d /tmp/runs/r2/checkpoints/step00000006 ]; then
    run r4_resume 2 train.max_steps=12 train.save_interval=100000 train.run_dir=/tmp/runs/r4 parallel.tp=2 \
      train.resume=/tmp/runs/r2/checkpoints/step00000006
    cp /tmp/runs/r4/metrics.jsonl "$out/r4_resume.metrics.jsonl"
  fi
fi
rm -f .deepspeed_env

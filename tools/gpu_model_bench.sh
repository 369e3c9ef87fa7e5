#!/usr/bin/env bash
# The whole-model benchmark on one GPU (BENCHMARKS.md): train configs/sparse05b.yaml briefly on
# real text with a strong L1, export it (neurons reordered on calibration tokens), then time the
# exported model dense vs sparse with tools/bench_model.py, and probe where the time goes.
# Usage (repo root; wheels for deepspeed & co. in .whl/, token shards in data/shards32k):
#   bash tools/gpu_model_bench.sh OUT_DIR [TRAIN_SECONDS] [train overrides...]
# STAGES="train export bench probe" picks stages (a warm machine keeps /tmp between calls).
# Training stops at train.max_steps or after TRAIN_SECONDS, whichever is first; its checkpoints
# are atomic, so a run stopped by the time limit exports the last complete one.
set -uo pipefail
out=${1:?output folder}; seconds=${2:-400}; shift 2 || shift $#
stages=${STAGES:-train export bench probe}
run=/tmp/runs/sparse05b; export_dir=/tmp/export/sparse05b
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 MEGASPARSE_CACHE=/tmp/megasparse_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
if [[ " $stages " == *" train "* ]]; then
  rm -rf $run   # a warm machine may hold an earlier run: start fresh, metrics.jsonl included
  start=$(date +%s)
  timeout --signal=TERM "$seconds" python3 -m megasparse.cli train configs/sparse05b.yaml train.run_dir=$run \
    train.progress_bar=false "$@" > "$out/train.log" 2>&1
  echo "train exit $? after $(( $(date +%s) - start )) s" | tee -a "$out/train.log"
  cp $run/metrics.jsonl "$out/train.metrics.jsonl" 2>/dev/null
  grep -E "^step|^\[valid\]|rror" "$out/train.log" | tail -6
fi
if [[ " $stages " == *" export "* ]]; then
  python3 -m megasparse.cli export $run $export_dir --calibration-data data/shards32k --device cuda --overwrite \
    > "$out/export.log" 2>&1; echo "export exit $?" | tee -a "$out/export.log"
  cp $export_dir/config.json "$out/export_config.json" 2>/dev/null
  tail -3 "$out/export.log"
fi
if [[ " $stages " == *" bench "* ]]; then
  BENCH_RESULTS_DIR=$out python3 tools/bench_model.py $export_dir --data data/shards32k \
    --sparsity-note "${SPARSITY_NOTE:-trained by tools/gpu_model_bench.sh (configs/sparse05b.yaml; see train.metrics.jsonl)}" \
    > "$out/bench.log" 2>&1; echo "bench exit $?" | tee -a "$out/bench.log"
  tail -30 "$out/bench.log"
fi
if [[ " $stages " == *" probe "* ]]; then   # where the time goes (tools/probe_model_time.py)
  BENCH_RESULTS_DIR=$out python3 tools/probe_model_time.py --export $export_dir --data data/shards32k \
    > "$out/probe.log" 2>&1; echo "probe exit $?" | tee -a "$out/probe.log"
  tail -30 "$out/probe.log"
fi

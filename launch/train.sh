#!/usr/bin/env bash
# Launch `megasparse train` through the deepspeed launcher, on one node or many.
#
#   launch/train.sh [--num_gpus N] [--num_nodes N] [--hostfile FILE] [--master_addr HOST]
#                   [--master_port PORT] CONFIG [key.sub=value ...]
#
# One node:   launch/train.sh --num_gpus 8 configs/125m.yaml parallel.tp=2
# Many nodes: launch/train.sh --hostfile launch/hostfile --master_addr node0 configs/125m.yaml
# On a CPU-only machine --num_gpus N starts N gloo processes (useful for tests).
# Variables other nodes need (the launcher forwards only NCCL*, PYTHON*, UCX*, MV2*) go in a
# .deepspeed_env file in the working directory or $HOME; see launch/deepspeed_env.template.
set -euo pipefail

launcher_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_gpus|--num_nodes|--hostfile|--master_addr|--master_port|--include|--exclude)
      [[ $# -ge 2 ]] || { echo "train.sh: $1 needs a value" >&2; exit 2; }
      launcher_args+=("$1" "$2"); shift 2 ;;
    --num_gpus=*|--num_nodes=*|--hostfile=*|--master_addr=*|--master_port=*|--include=*|--exclude=*)
      launcher_args+=("$1"); shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    --*) echo "train.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { echo "train.sh: missing CONFIG (e.g. configs/demo.yaml)" >&2; exit 2; }
[[ -f "$1" ]] || { echo "train.sh: config file '$1' not found" >&2; exit 2; }

# Keep NVLink multicast off: it is unreliable on shared multi-GPU hosts.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
# CPU processes share the cores; one thread each avoids oversubscription.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# --no_local_rank: LOCAL_RANK comes from the environment; no argv flag to parse.
exec deepspeed "${launcher_args[@]}" --no_local_rank --module megasparse.cli train "$@"

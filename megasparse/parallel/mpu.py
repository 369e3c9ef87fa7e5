"""The `mpu` ("model parallel unit") object DeepSpeed asks for the process groups.

Checked against DeepSpeed 0.19.8's source: with an mpu, ZeRO-1/2/3 partition and average over
``get_data_parallel_group()`` (utils/groups.py ``_get_data_parallel_group``), the engine takes
its DP world size and rank for batch arithmetic and samplers from it, checkpoints are written
per ``get_model_parallel_rank()`` (``mp_rank_XX`` files), and the grad norm is summed over
``get_model_parallel_group()`` after each rank adds its ``tensor_model_parallel`` parameters and,
on TP rank 0 only (``bwc_tensor_model_parallel_rank``), the replicated ones (runtime/utils.py
``is_model_parallel_parameter``, used by zero/stage_1_and_2.py ``get_grad_norm_direct``,
zero/stage3.py, bf16_optimizer.py ``get_grads_for_norm`` and ``clip_grad_norm_``). Model parallel
here is tensor parallel only: there is no pipeline, so the "model parallel" getters name the TP
group.

Deliberately absent: ``initialize_sequence_parallel`` and the sequence-parallel getters. Their
presence switches DeepSpeed to sequence-parallel semantics (it would then ignore our DP group).
"""
from __future__ import annotations

import torch.distributed as dist

from megasparse.parallel.state import ParallelState


class MegasparseMPU:
    def __init__(self, state: ParallelState):
        self.state = state

    # ---- tensor (= model) parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.state.tp_size

    def get_tensor_model_parallel_group(self):
        return self.state.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group (TP ranks are consecutive)."""
        return dist.get_rank() - self.state.tp_rank

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_src_rank = get_tensor_model_parallel_src_rank
    # Older DeepSpeed pipeline code calls the TP dimension the "slice".
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # ---- data parallel
    def get_data_parallel_rank(self) -> int:
        return self.state.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.state.dp_size

    def get_data_parallel_group(self):
        return self.state.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        """Global ranks of this rank's DP group: one per TP group, same TP rank."""
        world = self.state.tp_size * self.state.dp_size
        return list(range(self.state.tp_rank, world, self.state.tp_size))

    # ---- no pipeline parallelism
    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

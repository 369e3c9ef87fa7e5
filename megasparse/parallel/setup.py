"""One call that turns `parallel.*` into what the trainer needs: process groups, the model's
parallel plan (which layers to build), and the `mpu` object DeepSpeed uses to find the groups."""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megasparse.config import Config, ModelConfig
from megasparse.parallel.random import model_parallel_seed
from megasparse.parallel.state import ParallelState, initialize_model_parallel


@dataclass
class ParallelSetup:
    state: ParallelState
    plan: object            # megasparse.model.transformer.ParallelPlan (or its TP subclass)
    mpu: object | None      # passed to deepspeed.initialize; None means "the whole world is DP"
    zero_stage: int = 0

    @property
    def dp_rank(self) -> int:
        return self.state.dp_rank

    @property
    def dp_group(self):
        return self.state.dp_group

    @property
    def tp_group(self):
        return self.state.tp_group

    @property
    def tp_rank(self) -> int:
        return self.state.tp_rank

    def build_model(self, model_cfg: ModelConfig):
        from megasparse.model.transformer import SparseLlama

        model = SparseLlama(model_cfg, self.plan)
        if self.zero_stage == 3:
            # The LM head's weight (the embedding's when tied) is used by model.output, not in its
            # owner's forward; ZeRO-3 only gathers what it is told a module uses.
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            register_external_parameter(model.output, model.head_weight())
        return model


def kv_replica_groups(state: ParallelState, n_kv_heads: int) -> dict:
    """When tp > n_kv_heads, each kv head lives on tp/n_kv_heads consecutive TP ranks whose
    weight gradients must be summed. new_group is collective, so every rank creates every group
    (in the same order) and keeps its own."""
    tp = state.tp_size
    if tp <= n_kv_heads:
        return {}
    replicas = tp // n_kv_heads
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, replicas):
        ranks = list(range(start, start + replicas))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return {replicas: mine}


def build_parallel(cfg: Config) -> ParallelSetup:
    """Needs torch.distributed initialised (a world of one is fine)."""
    from megasparse.model.transformer import ParallelPlan

    state = initialize_model_parallel(cfg.parallel.tp)
    model_parallel_seed(cfg.train.seed, state.tp_rank)
    if cfg.parallel.tp == 1:
        # init_seed: the same full weights as a tp>1 run with this seed.
        return ParallelSetup(state=state, plan=ParallelPlan(init_seed=cfg.train.seed), mpu=None,
                             zero_stage=cfg.parallel.zero_stage)
    from megasparse.parallel.mpu import MegasparseMPU
    from megasparse.parallel.plan import TensorParallelPlan

    plan = TensorParallelPlan(state, kv_replica_groups(state, cfg.model.n_kv_heads), init_seed=cfg.train.seed)
    return ParallelSetup(state=state, plan=plan, mpu=MegasparseMPU(state), zero_stage=cfg.parallel.zero_stage)

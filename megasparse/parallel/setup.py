"""One call that turns `parallel.*` into what the trainer needs: process groups, the model's
parallel plan (which layers to build), and the `mpu` object DeepSpeed uses to find the groups."""
from __future__ import annotations

from dataclasses import dataclass

from megasparse.config import Config, ModelConfig
from megasparse.parallel.state import ParallelState, initialize_model_parallel


@dataclass
class ParallelSetup:
    state: ParallelState
    plan: object            # megasparse.model.transformer.ParallelPlan (or its TP subclass)
    mpu: object | None      # passed to deepspeed.initialize; None means "the whole world is DP"

    @property
    def dp_rank(self) -> int:
        return self.state.dp_rank

    @property
    def dp_group(self):
        return self.state.dp_group

    @property
    def tp_group(self):
        return self.state.tp_group

    def build_model(self, model_cfg: ModelConfig):
        from megasparse.model.transformer import SparseLlama

        return SparseLlama(model_cfg, self.plan)


def build_parallel(cfg: Config) -> ParallelSetup:
    from megasparse.model.transformer import ParallelPlan

    state = initialize_model_parallel(cfg.parallel.tp)
    if cfg.parallel.tp == 1:
        return ParallelSetup(state=state, plan=ParallelPlan(), mpu=None)
    from megasparse.errors import ConfigError

    raise ConfigError(f"parallel.tp={cfg.parallel.tp}: tensor parallelism is not available in this build; use parallel.tp=1")

"""The DeepSpeed JSON, generated from our config so that batch sizes have a single source."""
from __future__ import annotations

from megasparse.config import BatchPlan, Config


def build_deepspeed_config(cfg: Config, plan: BatchPlan, use_bf16: bool) -> dict:
    stage = cfg.parallel.zero_stage
    zero: dict = {"stage": stage}
    if stage >= 2:
        # Bucketing sizes that suit small and large models alike; overlap needs a CUDA stream.
        zero.update({"contiguous_gradients": True, "overlap_comm": False,
                     "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7})
    if stage == 3:
        zero.update({"stage3_param_persistence_threshold": 1e4, "stage3_max_live_parameters": 1e9,
                     "stage3_prefetch_bucket_size": 5e7})
    return {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": use_bf16, "check_grad_overflow": cfg.train.check_grad_overflow},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # We pass torch's AdamW; DeepSpeed otherwise refuses it under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,          # our own metrics logger prints
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every forward and every step
        # (2 syncs per micro-batch, which stop the host from queueing ahead); our metrics logger
        # measures tokens/s itself, with one sync per log interval.
        "timers": {"throughput": {"enabled": False}},
        "checkpoint": {"tag_validation": "Warn"},
    }

"""Resume a Trainer from a checkpoint: checks first, then DeepSpeed's load, then our state.

Planning happens before the DeepSpeed engine exists, because a change of DP degree under
ZeRO-1/2 needs an engine built to load DeepSpeed's universal (re-partitionable) format.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from megasparse.errors import CheckpointError
from megasparse.train.checkpoint import check_compatible, load_rank_state, load_rng_state, read_meta, resolve_resume
from megasparse.train.interval import StepTotals
from megasparse.train.universal import UNIVERSAL_SUFFIX, ensure_universal


@dataclass
class ResumePlan:
    load_dir: str
    tag: str            # the tag DeepSpeed loads (the universal copy when `universal`)
    source: str         # the checkpoint folder the user pointed at
    meta: dict
    reset: bool         # weights only: fresh optimizer
    same_dp: bool
    universal: bool


def plan_resume(trainer) -> ResumePlan | None:
    cfg = trainer.cfg
    found = resolve_resume(cfg.train.resume, trainer.ckpt_dir)
    if found is None:
        if cfg.train.resume == "auto" and trainer.is_main:
            print(f"train.resume=auto: no checkpoint in {trainer.ckpt_dir}, starting from scratch", flush=True)
        return None
    load_dir, tag = found
    where = os.path.join(load_dir, tag)
    meta = read_meta(load_dir, tag)
    check_compatible(meta, cfg.model.__dict__, cfg.parallel.tp, where)
    trainer.data.check_resume(meta["tokenizer_hash"], meta["data_hash"], where)
    saved_seed = meta.get("seed")   # absent in checkpoints written before it was recorded
    if saved_seed is not None and saved_seed != cfg.train.seed:
        raise CheckpointError(f"{where} was trained with train.seed={saved_seed}, but this run has "
                              f"train.seed={cfg.train.seed}; the seed fixes the sample order, so another one would "
                              f"repeat some samples and skip others. Resume with train.seed={saved_seed}")
    reset = cfg.train.reset_optimizer_on_resume
    states = meta.get("optimizer_states", True)
    if not states and not reset:
        raise CheckpointError(f"{where} holds no optimizer state (it was written by `megasparse convert "
                              f"--weights-only` or from a ZeRO-0 run); resume it with "
                              f"train.reset_optimizer_on_resume=true")
    same_dp = meta["dp"] == trainer.batch.dp
    universal = False
    if states == "universal" and not reset:
        # `megasparse convert` output: the moments exist only as a universal checkpoint beside it.
        if cfg.parallel.zero_stage not in (1, 2):
            raise CheckpointError(f"{where} carries its optimizer moments as a universal checkpoint (from "
                                  f"`megasparse convert`), which loads under ZeRO-1/2 only; set "
                                  f"parallel.zero_stage=1 or 2, or train.reset_optimizer_on_resume=true")
        tag, universal, same_dp = tag + UNIVERSAL_SUFFIX, True, False
    elif not same_dp and not reset:
        if meta["zero_stage"] != cfg.parallel.zero_stage:
            raise CheckpointError(
                f"{where} was saved at DP={meta['dp']} with ZeRO-{meta['zero_stage']}; resuming at DP={trainer.batch.dp} "
                f"with ZeRO-{cfg.parallel.zero_stage} is supported with the same ZeRO stage only. Resume with "
                f"parallel.zero_stage={meta['zero_stage']}, or set train.reset_optimizer_on_resume=true "
                f"(weights only, fresh optimizer)")
        if cfg.parallel.zero_stage == 3 and cfg.parallel.tp > 1:
            # DeepSpeed's ZeRO-3 universal loader merges TP shards only for its own AutoTP
            # layout; on ours it fails deep inside the load (measured on 0.19.8).
            raise CheckpointError(
                f"{where} was saved at DP={meta['dp']} with ZeRO-3 and tp={cfg.parallel.tp}; changing the DP degree "
                f"of a ZeRO-3 checkpoint works at tp=1 only. Resume at DP={meta['dp']}, or set "
                f"train.reset_optimizer_on_resume=true (weights only, fresh optimizer)")
        if cfg.parallel.zero_stage in (1, 2, 3):
            tag = ensure_universal(load_dir, tag, trainer.dist.rank)
            universal = True
    if reset and trainer.is_main:
        print(f"WARNING: train.reset_optimizer_on_resume=true: loading only the weights of {where}; optimizer "
              f"moments start afresh (the LR schedule continues at the saved step), so the loss will not match "
              f"an uninterrupted run", file=sys.stderr, flush=True)
    return ResumePlan(load_dir, tag, where, meta, reset, same_dp, universal)


# Param-group entries that are not hyperparameters, or that the LR scheduler owns.
_NOT_HYPERPARAMETERS = ("params", "lr", "initial_lr")


def _group_hyperparameters(optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k not in _NOT_HYPERPARAMETERS} for g in optimizer.param_groups]


_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")


def _restore_adamw_implementation(optimizer, groups: list[dict]) -> None:
    """The AdamW kernels come from this run's config (optim.implementation), not the checkpoint:
    torch's load_state_dict puts the saved groups' fused/foreach flags back. The step counters
    then go where the chosen kernels want them, by torch's own rule: on the parameter's device
    in fp32 for fused (a universal checkpoint, loaded with map_location=cpu, has them on the CPU,
    and the fused kernel refuses that), on the CPU otherwise.

    Each parameter gets its own copy: DeepSpeed's universal loader hands ONE step tensor to every
    parameter's state, and torch's Adam increments it in place once per parameter, so the bias
    correction would run ahead (found by the ZeRO-3 DP-change test: the step went 4 -> 6 in one
    step). The states are walked directly: under ZeRO-3 the groups' "params" are empty between
    steps (DeepSpeed fills them per sub-group at step time), and one config sets every group's
    kernels."""
    for group, hyper in zip(optimizer.param_groups, groups):
        for key in _IMPLEMENTATION_KEYS:
            if key in hyper:
                group[key] = hyper[key]
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for p, state in optimizer.state.items():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.to(device=p.device if on_device else "cpu", dtype=torch.float32, copy=True)


def apply_resume(trainer, plan: ResumePlan) -> None:
    reset = plan.reset
    # DeepSpeed's ZeRO-3 universal loader copies param group 0's hyperparameters into EVERY
    # group, so the no-decay group (norms) would resume with weight decay. Ours come from the
    # config, so they are put back after any universal load.
    groups = _group_hyperparameters(trainer.lr_scheduler.optimizer)
    _path, client = trainer.engine.load_checkpoint(
        plan.load_dir, tag=plan.tag, load_optimizer_states=not reset, load_lr_scheduler_states=not reset,
        load_module_only=reset, load_module_strict=True)
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {plan.source}; check that its files are complete")
    scheduler = trainer.lr_scheduler
    if plan.universal:
        for group, hyper in zip(scheduler.optimizer.param_groups, groups):
            group.update(hyper)
    _restore_adamw_implementation(scheduler.optimizer, groups)   # also unshares the loader's step tensor
    if not reset:
        _schedule_from_config(scheduler, trainer.cfg.optim, client.get("config", {}).get("optim", {}),
                              trainer.is_main)
        # DeepSpeed's universal ZeRO loader restores the optimizer's moments but not its param
        # groups, so the first resumed step would use the LR of step 0; take it from the
        # restored scheduler instead (a no-op for an ordinary load).
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    trainer.step = client["step"]
    trainer.consumed_samples = client["consumed_samples"]
    if reset:  # the fresh scheduler sits at step 0: move it to the saved step
        scheduler.last_epoch = trainer.step - 1
        scheduler.step()
    trainer.l1_schedule.load_state_dict(client["l1_schedule"])
    _restore_open_interval(trainer, plan, client)
    if "mlp_backends" in client:
        # a converted folder's choices were timed at another layout (often another local H)
        trainer.engine.module.load_backend_state(client["mlp_backends"],
                                                 keep_choices="converted_from" not in plan.meta)
    trainer.reinit.load_state_dict(client.get("sparsity_reinit", {}))
    load_rng_state(plan.load_dir, plan.tag, trainer.dist.rank, same_layout=plan.same_dp)
    if trainer.is_main:
        print(f"resumed from {plan.source}: step {trainer.step}, {trainer.consumed_samples} samples consumed",
              flush=True)


def _restore_open_interval(trainer, plan: ResumePlan, client: dict) -> None:
    """The log interval the save fell into (interval.py). At the same layout every rank takes its
    own sums from its file, so the next log line is bit-identical to the uninterrupted run's; at
    another DP degree DP rank 0 takes the DP sums from the client state and the others start from
    zero. The statistics window is DP-reduced already and is restored whenever the local shapes
    match. Not from a `megasparse convert` folder: its client state is TP rank 0's, copied to
    every TP rank, and the statistics are per TP shard."""
    own = load_rank_state(plan.load_dir, plan.tag, trainer.dist.rank) if plan.same_dp else None
    holds_sums = own is not None or trainer.parallel.dp_rank == 0
    stats = None if "converted_from" in plan.meta else client.get("sparsity_stats")
    if stats is not None and trainer.stats.load_state_dict(stats, holds_interval=own is None and holds_sums) \
            and own is not None:
        trainer.stats.load_interval(own["sparsity_interval"])
    totals = own["open_interval"] if own is not None else client.get("open_interval")
    trainer.totals = StepTotals.restored(trainer.dist.device, totals, holds_sums=holds_sums)


_SCHEDULE_FIELDS = ("lr", "min_lr", "warmup_steps", "lr_decay_steps")


def _schedule_from_config(scheduler, optim_cfg, saved_optim: dict, is_main: bool) -> None:
    """The LR schedule is this run's config at the saved step. Its multiplier already reads the
    config (optimizer.lr_multiplier), but torch's LambdaLR restores the checkpoint's base LR, so a
    changed optim.lr would multiply the old LR by a factor built for the new one. Set the base LR
    from the config too, and say what changed."""
    changed = [f"optim.{k} {saved_optim[k]} -> {getattr(optim_cfg, k)}" for k in _SCHEDULE_FIELDS
               if k in saved_optim and saved_optim[k] != getattr(optim_cfg, k)]
    scheduler.base_lrs = [optim_cfg.lr for _ in scheduler.base_lrs]
    scheduler._last_lr = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    if changed and is_main:
        print(f"resume: the LR schedule follows this run's config ({', '.join(changed)})", flush=True)

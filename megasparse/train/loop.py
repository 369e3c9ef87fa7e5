"""The training loop: data -> model -> DeepSpeed engine -> metrics, evaluation, checkpoints.

Loss = CE + lambda(step) * aux, where aux is the mean over layers of each layer's L1 term and
lambda comes from the L1 schedule (megasparse/sparsity/schedule.py).
"""
from __future__ import annotations

import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from megasparse import __version__
from megasparse.config import Config, resolve_batch, save_config
from megasparse.errors import TrainingError
from megasparse.sparsity.reinit import DeadNeuronReinit
from megasparse.sparsity.schedule import build_l1_schedule
from megasparse.sparsity.stats import SparsityStats
from megasparse.train.checkpoint import save_checkpoint
from megasparse.train.deepspeed_config import build_deepspeed_config
from megasparse.train.distributed import DistInfo, init_distributed, shutdown_distributed
from megasparse.train.interval import StepTotals
from megasparse.train.flops import executed_flops_per_token, model_flops_per_token, peak_flops
from megasparse.train.metrics import MetricsLogger
from megasparse.train.optimizer import build_lr_scheduler, build_optimizer
from megasparse.train.profiling import StepProfiler, phase
from megasparse.train.resume import apply_resume, plan_resume
from megasparse.train.universal import universal_info


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config):
        from megasparse.parallel.setup import build_parallel  # TP-aware model plan and mpu

        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.train.device, cfg.parallel.backend)
        self.parallel = build_parallel(cfg)
        self.batch = resolve_batch(cfg, self.dist.world_size)
        self.is_main = self.dist.rank == 0
        self.run_dir = cfg.train.run_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        if self.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        seed_everything(cfg.train.seed)
        self.data = self._build_data()
        self.model = self.parallel.build_model(cfg.model)
        self.use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and self.dist.device.type == "cuda")
        self.resume_plan = plan_resume(self)  # before the engine: a DP change needs a universal load
        self._init_engine()

        self.l1_schedule = build_l1_schedule(cfg.sparsity, hidden_size=cfg.model.ffn_hidden)
        hidden_local = cfg.model.ffn_hidden // cfg.parallel.tp
        self.stats = SparsityStats(cfg.model.n_layers, hidden_local, cfg.model.ffn_hidden, self.dist.device,
                                   window_tokens=cfg.sparsity.stats_window_tokens,
                                   tp_group=self.parallel.tp_group)
        self.reinit = DeadNeuronReinit(cfg.sparsity, cfg.model.init_std, cfg.train.seed, self.parallel.tp_rank)
        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main)
        self.profiler = StepProfiler(cfg.train.profile_steps, self.run_dir, self.dist.device, self.is_main)
        self.step = 0
        self.consumed_samples = 0
        self.totals = StepTotals(self.dist.device)   # the open log interval (a resume restores it)
        self.stop_signal_received = False  # set by the handler, never cleared: a signal is not lost
        self.stop_requested = False        # what all ranks agreed on at the last micro-batch
        self._install_signal_handlers()
        if self.resume_plan is not None:
            apply_resume(self, self.resume_plan)

    # ------------------------------------------------------------------ setup
    def _build_data(self):
        from megasparse.data import build_data

        # Rank 0 first: it may train and cache the demo tokenizer; the others then read the cache.
        if not self.is_main:
            dist.barrier()
        data = build_data(self.cfg.data, vocab_size=self.cfg.model.vocab_size, seed=self.cfg.train.seed)
        if self.is_main:
            dist.barrier()
        return data

    def _init_engine(self) -> None:
        import deepspeed

        cfg = self.cfg
        self.model.to(self.dist.device)
        optimizer = build_optimizer(self.model, cfg.optim)
        scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        ds_config = build_deepspeed_config(cfg, self.batch, self.use_bf16)
        if self.resume_plan is not None and self.resume_plan.universal:
            ds_config["checkpoint"]["load_universal"] = True
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            mpu=self.parallel.mpu, dist_init_required=False)

    # ------------------------------------------------------------------ resume and signals
    def _install_signal_handlers(self) -> None:
        """SIGTERM (schedulers' pre-emption notice) and SIGUSR1 ask for a checkpoint, then a clean
        exit, at the next micro-batch boundary where all ranks agree (no collective is added)."""
        def request_stop(signum, _frame):
            self.stop_signal_received = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    # ------------------------------------------------------------------ data
    def _micro_batches(self, dataset, indices: list[int]):
        mb = self.batch.micro_batch_size
        for start in range(0, len(indices), mb):
            seqs = torch.stack([dataset[i] for i in indices[start:start + mb]])
            if self.dist.device.type == "cuda":
                # A copy from pageable memory waits for the stream to drain first; from pinned
                # memory it is queued behind the previous micro-batch's backward.
                seqs = seqs.pin_memory()
            seqs = seqs.to(self.dist.device, non_blocking=True)
            yield seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()

    # ------------------------------------------------------------------ steps
    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """One small all-reduce per micro-batch makes every rank agree on two things: whether the
        loss is finite (else ZeRO's collectives would diverge), and whether any rank was asked
        to stop by a signal."""
        flags = torch.stack([torch.isfinite(loss.detach()).to(torch.int32),
                             torch.tensor(int(not self.stop_signal_received), dtype=torch.int32,
                                          device=loss.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        finite, keep_going = flags.tolist()
        # The agreed flag is separate from the handler's: a signal that lands during this all-reduce
        # was once overwritten here and lost; it now reaches the next micro-batch's vote instead.
        self.stop_requested = not keep_going
        return bool(finite)

    def train_step(self, indices: list[int], totals: StepTotals) -> None:
        lam = self.l1_schedule.coeff(self.step)
        for inputs, labels in self._micro_batches(self.data.train, indices):
            with phase("forward"):
                out = self.engine(inputs, labels)
                loss = out.ce_loss + lam * out.aux_loss
            with phase("nonfinite_vote"):
                finite = self._finite_everywhere(loss)
            if not finite:
                if self.cfg.train.on_nonfinite == "stop":
                    raise TrainingError(
                        f"non-finite loss ({loss.item()}) at step {self.step + 1}; lower optim.lr, check the data, "
                        f"or set train.on_nonfinite=skip to drop such micro-batches")
                # Skip: a zero loss tied to every parameter gives zero gradients, so the collective
                # schedule of ZeRO stays identical on every rank while this batch contributes nothing.
                loss = sum(p.sum() for p in self.engine.module.parameters() if p.requires_grad) * 0.0
                totals.skipped += 1
            else:
                totals.loss += loss.detach().float()
                totals.ce += out.ce_loss.detach().float()
                totals.aux += out.aux_loss.detach().float()
                totals.micro_batches += 1
                with phase("statistics"):
                    self.stats.update(out.fire_counts, out.l1_per_layer, out.tokens, out.token_nnz)
            with phase("backward"):
                self.engine.backward(loss)
            with phase("engine_step"):   # the optimizer step at the last micro-batch
                self.engine.step()
        self.step += 1
        self.consumed_samples += self.batch.global_batch_size

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean CE over the first eval_iters global batches of the held-out split."""
        self.engine.eval()
        # DeepSpeed's steps write the weights without moving their version counters, which is
        # all the twell eval layouts' cache key can see: rebuild them from the current weights.
        self.engine.module.weights_updated()
        n_valid = len(self.data.valid)
        per_rank = self.batch.global_batch_size // self.batch.dp
        total = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        for it in range(self.cfg.train.eval_iters):
            base = (it * self.batch.global_batch_size) % max(n_valid, 1)
            start = base + self.parallel.dp_rank * per_rank
            indices = [(start + k) % n_valid for k in range(per_rank)]
            for inputs, labels in self._micro_batches(self.data.valid, indices):
                out = self.engine(inputs, labels)
                total += torch.stack([out.ce_loss.double() * labels.numel(),
                                      torch.tensor(float(labels.numel()), device=total.device, dtype=torch.float64)])
        self.engine.train()
        dist.all_reduce(total, group=self.parallel.dp_group)
        val_loss = (total[0] / total[1]).item()
        return {"step": self.step, "val_loss": val_loss, "val_ppl": float(np.exp(min(val_loss, 50.0)))}

    def client_state(self) -> dict:
        """What DeepSpeed saves beside the model (from DP rank 0). Collectives over DP: the open
        interval's sums are DP-reduced here, for a resume at another DP degree."""
        dp = self.parallel.dp_group
        return {"step": self.step, "consumed_samples": self.consumed_samples,
                "config": self.cfg.to_dict(), "l1_schedule": self.l1_schedule.state_dict(),
                "sparsity_stats": self.stats.state_dict(dp), "open_interval": self.totals.reduced_state(dp),
                "mlp_backends": self.engine.module.backend_state(),
                "universal_checkpoint_info": universal_info([n for n, _ in self.engine.module.named_parameters()]),
                "sparsity_reinit": self.reinit.state_dict(),
                "tokenizer_hash": self.data.tokenizer_hash, "data_hash": self.data.data_hash,
                "megasparse_version": __version__}

    def rank_state(self) -> dict:
        """This rank's own open-interval sums, for an exact resume at the same layout."""
        return {"open_interval": self.totals.state(), "sparsity_interval": self.stats.interval_state()}

    def _shard_layout(self) -> dict:
        """name -> how it is split over TP (what `megasparse convert` needs to reshard)."""
        from megasparse.parallel.sharding import shard_of

        layout = {}
        for name, p in self.engine.module.named_parameters():
            info = shard_of(p)
            if info is not None:
                layout[name] = {"dim": info.dim, "full_size": info.full_size, "replicas": info.replicas}
        return layout

    def checkpoint_meta(self) -> dict:
        return {"shards": self._shard_layout(), "optimizer_states": True, "step": self.step, "consumed_samples": self.consumed_samples, "tp": self.cfg.parallel.tp,
                "dp": self.batch.dp, "zero_stage": self.cfg.parallel.zero_stage, "seed": self.cfg.train.seed,
                "config": self.cfg.to_dict(),
                "tokenizer_hash": self.data.tokenizer_hash, "data_hash": self.data.data_hash,
                "megasparse_version": __version__}

    def save(self) -> str:
        from megasparse.sparsity.firing import dump_window_firing_rates

        # Per-neuron firing rates of the statistics window, for `megasparse report` (TP collective).
        dump_window_firing_rates(self.run_dir, self.step, self.stats, self.parallel.tp_group, self.is_main)
        t = self.cfg.train
        return save_checkpoint(self.engine, self.ckpt_dir, self.step, self.client_state(), self.dist.rank,
                               self.checkpoint_meta(), keep_last=t.keep_last, keep_every=t.keep_every,
                               rank_state=self.rank_state())

    # ------------------------------------------------------------------ logging
    def _log_record(self, totals: StepTotals) -> dict:
        steps, elapsed = totals.steps, totals.seconds
        cfg = self.cfg
        sums = torch.stack([totals.loss, totals.ce, totals.aux,
                            torch.tensor(float(totals.micro_batches), device=self.dist.device)])
        dist.all_reduce(sums, group=self.parallel.dp_group)
        loss, ce, aux, n = sums.tolist()
        if n == 0:  # every micro-batch of the interval was skipped as non-finite
            loss = ce = aux = n = float("nan")
        sparsity = self.stats.reduce_and_reset(self.parallel.dp_group, self.parallel.tp_group)
        nnz_frac = sparsity.get("nnz_fraction_layer")
        if nnz_frac:
            decided = self.engine.module.set_measured_nnz(nnz_frac, self.step)
            if decided and self.is_main:
                for layer, (choice, ms) in decided.items():
                    print(f"layer {layer} MLP: dense {ms['torch']:.3f} ms vs sparse {ms['hybrid']:.3f} ms per "
                          f"forward+backward (rank 0) -> {'hybrid' if choice == 'hybrid' else 'stays dense'}",
                          flush=True)
        tokens = steps * self.batch.global_batch_size * cfg.data.seq_len
        tokens_per_s = tokens / max(elapsed, 1e-9)
        model_fpt = model_flops_per_token(cfg.model, cfg.data.seq_len)
        sparse_layers = [getattr(layer.mlp, "last_backend", "torch") == "hybrid" for layer in self.engine.module.layers]
        exec_fpt = executed_flops_per_token(cfg.model, cfg.data.seq_len, nnz_frac or [1.0] * cfg.model.n_layers,
                                            sparse_layers)
        world = self.dist.world_size
        model_tflops = model_fpt * tokens_per_s / world / 1e12  # per GPU
        peak = peak_flops(self.dist.device)
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.step, "loss": loss / n, "ce_loss": ce / n, "l1_term": aux / n,
            "l1_coeff": self.l1_schedule.coeff(self.step), "lr": self.lr_scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens_per_s, "model_tflops": model_tflops,
            "executed_tflops": exec_fpt * tokens_per_s / world / 1e12,
            "mfu": model_tflops * 1e12 / peak if peak else None,
            "consumed_samples": self.consumed_samples, "skipped_micro_batches": totals.skipped,
            "sparse_layers": sum(sparse_layers),
        }
        if self.dist.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        record.update(sparsity)
        record.update(self.l1_schedule.observe(self.step, record) or {})  # e.g. nnz_target
        record.update(self.reinit(self.step, self.stats, self.engine))      # periodic, when enabled
        return record

    def _progress(self):
        if self.is_main and self.cfg.train.progress_bar and sys.stdout.isatty():
            from tqdm import tqdm

            return tqdm(total=self.cfg.train.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        return None

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict:
        cfg = self.cfg.train
        self.profiler.check_window(self.step + 1)
        sampler = iter(self.data.sampler(self.batch.global_batch_size, self.parallel.dp_rank, self.batch.dp,
                                         consumed_samples=self.consumed_samples))
        last_record = {}
        t0 = time.perf_counter() - self.totals.seconds   # a resumed interval's time so far counts
        bar = self._progress()
        try:
            while self.step < cfg.max_steps:
                self.profiler.before_step(self.step + 1)
                self.train_step(next(sampler), self.totals)
                self.profiler.after_step(self.step)
                self.totals.steps += 1
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    if self.dist.device.type == "cuda":
                        torch.cuda.synchronize()
                    self.totals.seconds = time.perf_counter() - t0
                    last_record = self._log_record(self.totals)
                    self.metrics.log(last_record)
                    self.totals = StepTotals(self.dist.device)
                    t0 = time.perf_counter()
                pause = time.perf_counter()
                self.totals.seconds = pause - t0   # what a save in this pause records
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                    self.metrics.log(self.evaluate(), prefix="valid")
                if self.step % cfg.save_interval == 0 or self.step == cfg.max_steps or self.stop_requested:
                    self.save()
                if self.stop_requested:
                    if self.is_main:
                        print(f"stop requested by a signal: saved step {self.step} and exiting", flush=True)
                    break
                t0 += time.perf_counter() - pause  # keep eval and save time out of tokens/s
        finally:
            self.profiler.close(self.step)   # a window cut short by a signal or an error
        if bar is not None:
            bar.close()
        self.metrics.close()
        return last_record

    def shutdown(self) -> None:
        """Release the engine and the process groups; every rank calls it after its last collective."""
        self.engine.destroy()
        shutdown_distributed()


def train(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    record = trainer.fit()
    trainer.shutdown()
    return record

#!/usr/bin/env python3
"""Does a DeepSpeed ZeRO-1/2 bf16 step on CUDA leave a twell eval layout serving stale weights?

    python tools/probe_twell_after_deepspeed_step.py     (one GPU; DeepSpeed installed)

A ReluGatedMLP (D=1024, H=2816, the benchmark generator) on the explicit twell backend evaluates,
trains 3 steps through a DeepSpeed engine, and evaluates again: without and with
ReluGatedMLP.weights_updated(). Prints the relative error against an fp32 reference on the
current weights. DeepSpeed writes the new weights through .data, which moves no version counter,
so the layout's cache key cannot see the step (kernels/twell/NOTES.md run 17).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import rel_err  # noqa: E402
from kernels.synthetic import make_ffn_inputs  # noqa: E402
from kernels.twell.reference import ffn_reference  # noqa: E402
from megasparse.model.sparse_mlp import ReluGatedMLP  # noqa: E402
from megasparse.train.distributed import init_distributed  # noqa: E402


def fp32_reference(mlp: ReluGatedMLP, x: torch.Tensor) -> torch.Tensor:
    return ffn_reference(x, *(p.detach() for p in (mlp.gate_weight, mlp.up_weight, mlp.down_weight)))


def check(stage: int, f) -> None:
    import deepspeed

    mlp = ReluGatedMLP(1024, 2816, backend="twell").cuda()
    with torch.no_grad():
        for p, w in ((mlp.gate_weight, f.w_gate), (mlp.up_weight, f.w_up), (mlp.down_weight, f.w_down)):
            p.copy_(w)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}
    engine, _, _, _ = deepspeed.initialize(model=mlp, optimizer=torch.optim.AdamW(mlp.parameters(), lr=1e-3),
                                           config=config)
    x = f.x.to(torch.bfloat16)
    with torch.no_grad():
        mlp(x[None])                      # 8192 tokens: the layout counts and chooses
        y0 = mlp(x[None])[0]
    print(stage, "eval before steps: choice", mlp._twell_layout.choice, "rel err", rel_err(y0, fp32_reference(mlp, x)))
    mlp.backend = "torch"                 # twell is inference-only
    for _ in range(3):
        y, l1, _, _ = engine(x[None])
        engine.backward((y.float() ** 2).mean() + 1e-3 * l1)
        engine.step()
    mlp.backend = "twell"
    with torch.no_grad():
        y1 = mlp(x[None])[0]
        ref = fp32_reference(mlp, x)
        print(stage, "eval after 3 steps, no invalidation: rel err vs current weights", rel_err(y1, ref),
              "vs the old output", rel_err(y1, y0.float()))
        mlp.weights_updated()
        mlp(x[None])
        y2 = mlp(x[None])[0]
        print(stage, "after weights_updated():", rel_err(y2, ref), "choice", mlp._twell_layout.choice)
    engine.destroy()


def main():
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29613")
    init_distributed("cuda", "nccl")
    f = make_ffn_inputs(8192, 1024, 2816, target_nnz=14.5, device="cuda", dtype=torch.float32, seed=3)
    for stage in (1, 2):
        check(stage, f)


if __name__ == "__main__":
    main()

"""`megasparse convert`: a tp=2 checkpoint resharded to tp=1 gives the same logits."""
import os
import sys

import pytest
import torch

from tests.trainer_utils import TINY, _port, check, run, torchrun_cmd

pytestmark = pytest.mark.slow
DRIVER = os.path.join(os.path.dirname(__file__), "logits_driver.py")


def logits_cmd(nproc, out, *overrides):
    args = [DRIVER, str(out), *TINY, *overrides]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_port()), *args]


@pytest.mark.parametrize("stage,dtype", [(1, "fp32"), (3, "bf16")])
def test_tp2_to_tp1_conversion_gives_same_logits(tmp_path, stage, dtype):
    """ZeRO-3 keeps the weights only in its optimizer shards: each TP rank's are consolidated
    (a bf16 run names them bf16_zero_pp_rank_...). bf16 logits at tp=2 and tp=1 differ by
    rounding, so that case compares at bf16's tolerance; its weights are compared exactly."""
    common = ["train.global_batch_size=2", "train.micro_batch_size=2", "parallel.tp=2",
              f"parallel.zero_stage={stage}", f"train.dtype={dtype}"]
    check(run(torchrun_cmd(2, tmp_path / "tp2", "train.max_steps=3", *common)))
    ckpt = tmp_path / "tp2" / "checkpoints"
    conv = run([sys.executable, "-m", "megasparse.cli", "convert", str(ckpt), str(tmp_path / "tp1"), "--tp", "1"])
    check(conv)
    assert (tmp_path / "tp1" / "latest").read_text() == "step00000003"
    load = ["train.reset_optimizer_on_resume=true", "train.max_steps=3"]
    # the reference: an ordinary resume of the tp=2 checkpoint (DeepSpeed's own weights-only load
    # of a ZeRO-3 checkpoint consolidates every TP rank's shards into one and fails)
    check(run(logits_cmd(2, tmp_path / "a.pt", "train.max_steps=3", "parallel.tp=2", f"parallel.zero_stage={stage}",
                         f"train.dtype={dtype}", f"train.resume={ckpt}", f"train.run_dir={tmp_path / 'la'}")))
    check(run(logits_cmd(1, tmp_path / "b.pt", *load, "parallel.tp=1", "parallel.zero_stage=1",
                         f"train.dtype={dtype}", f"train.resume={tmp_path / 'tp1'}", f"train.run_dir={tmp_path / 'lb'}")))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a["step"] == b["step"] == 3
    assert a["logits"].shape == b["logits"].shape and a["logits"].shape[-1] == 512
    tol = 1e-5 if dtype == "fp32" else 3e-2
    torch.testing.assert_close(a["logits"].float(), b["logits"].float(), rtol=tol, atol=tol)
    if stage == 3:   # export reads a ZeRO-3 checkpoint, and the converted folder, as convert does
        from megasparse.export import export_checkpoint
        from megasparse.inference import load_pretrained

        converted = torch.load(tmp_path / "tp1" / "step00000003" / "mp_rank_00_model_states.pt",
                               weights_only=False)["module"]
        assert all(t.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32) for t in converted.values())
        for src in (ckpt, tmp_path / "tp1"):
            out = tmp_path / f"hf_{src.name}"
            export_checkpoint(str(src), str(out), log=lambda *a: None)
            exported = load_pretrained(str(out), mlp_backend="torch").state_dict()
            assert exported.keys() == converted.keys()
            assert all(torch.equal(exported[k], converted[k]) for k in exported), src


def test_weights_only_conversion_needs_the_reset_flag_and_right_tp(tmp_path):
    common = ["train.global_batch_size=2", "train.micro_batch_size=2", "parallel.tp=2", "train.max_steps=2"]
    check(run(torchrun_cmd(2, tmp_path / "tp2", *common)))
    ckpt = tmp_path / "tp2" / "checkpoints"
    check(run([sys.executable, "-m", "megasparse.cli", "convert", str(ckpt), str(tmp_path / "tp1"), "--tp", "1",
               "--weights-only"]))
    no_flag = run([sys.executable, "-m", "megasparse.cli", "train", "configs/demo.yaml", *TINY,
                   f"train.run_dir={tmp_path / 'x'}", f"train.resume={tmp_path / 'tp1'}", "train.max_steps=3"])
    assert no_flag.returncode != 0 and "reset_optimizer_on_resume=true" in no_flag.stderr
    wrong_tp = run([sys.executable, "-m", "megasparse.cli", "train", "configs/demo.yaml", *TINY,
                    f"train.run_dir={tmp_path / 'y'}", f"train.resume={ckpt}", "train.max_steps=3"])
    assert wrong_tp.returncode != 0 and "megasparse convert" in wrong_tp.stderr


@pytest.mark.parametrize("src_tp,dst_tp", [(2, 1), (1, 2)])
def test_conversion_carries_adam_moments(tmp_path, src_tp, dst_tp):
    """ZeRO-1 at tp=A x dp=2, killed after step 4, converted to tp=B and resumed there (at dp=2):
    the per-step losses continue as the uninterrupted run's, which needs the moments (a fresh
    optimizer changes step 5's update). K/V are replicated at tp=2 (n_kv_heads=1)."""
    from tests.test_resume import driver_cmd, losses_by_step

    common = ["train.max_steps=8", "train.save_interval=4", "train.global_batch_size=4",
              "train.micro_batch_size=2", "parallel.zero_stage=1"]
    check(run(torchrun_cmd(2 * src_tp, tmp_path / "straight", *common, f"parallel.tp={src_tp}")))
    run(driver_cmd(2 * src_tp, tmp_path / "src", "--kill-after-save", 4, *common, f"parallel.tp={src_tp}"))
    conv = run([sys.executable, "-m", "megasparse.cli", "convert", str(tmp_path / "src" / "checkpoints"),
                str(tmp_path / "conv"), "--tp", str(dst_tp)])
    check(conv)
    assert "Adam moments" in conv.stdout
    resumed = tmp_path / "resumed"
    check(run(torchrun_cmd(2 * dst_tp, resumed, *common, f"parallel.tp={dst_tp}",
                           f"train.resume={tmp_path / 'conv'}")))
    straight, again = losses_by_step(tmp_path / "straight"), losses_by_step(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    for step in again:
        assert again[step][0] == pytest.approx(straight[step][0], rel=1e-5), step

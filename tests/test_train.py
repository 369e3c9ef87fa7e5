"""The real trainer end to end: single process, torchrun with ZeRO-1/2, the deepspeed launcher."""
import json

import pytest

from tests.trainer_utils import check, read_metrics, run, torchrun_cmd, train_cmd

pytestmark = pytest.mark.slow


def test_single_process_trains_logs_and_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, "train.max_steps=6", "train.eval_interval=3", "train.save_interval=3"))
    check(proc)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "ce_loss", "l1_coeff", "nnz_per_token", "lr", "grad_norm", "tokens_per_s",
                "model_tflops", "executed_tflops", "dead_fraction", "l1_term", "nnz_max_layer"):
        assert key in rows[-1], key
    assert rows[-1]["ce_loss"] < rows[0]["ce_loss"]
    valid = read_metrics(run_dir, "valid")
    assert [r["step"] for r in valid] == [3, 6] and valid[0]["val_ppl"] > 1
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000006"
    assert (ckpt / "step00000003").is_dir() and (ckpt / "step00000006").is_dir()
    assert (run_dir / "config.yaml").is_file() and any((run_dir / "tb").iterdir())
    assert "step 6" in proc.stdout and "nnz/tok" in proc.stdout


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_data_parallel_matches_single_process(tmp_path, zero_stage):
    """2 gloo ranks x micro-batch 2 must reproduce 1 rank x micro-batch 2 x accumulation 2."""
    common = ["train.max_steps=4", "train.global_batch_size=4", "train.micro_batch_size=2",
              f"parallel.zero_stage={zero_stage}"]
    check(run(train_cmd(tmp_path / "one", *common)))
    check(run(torchrun_cmd(2, tmp_path / "two", *common)))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["nnz_per_token"] == pytest.approx(b["nnz_per_token"], rel=1e-5)


def test_deepspeed_launcher_two_processes(tmp_path):
    proc = run(["bash", "launch/train.sh", "--num_gpus", "2", "--master_port", "29517", "configs/demo.yaml",
                *__import__("tests.trainer_utils", fromlist=["TINY"]).TINY, f"train.run_dir={tmp_path / 'ds'}",
                "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=2"])
    check(proc)
    rows = read_metrics(tmp_path / "ds")
    assert [r["step"] for r in rows] == [1, 2]
    saved = json.loads(json.dumps(rows[-1]))
    assert saved["consumed_samples"] == 8


def test_profile_steps_writes_trace_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, "train.max_steps=4", "train.profile_steps=[2,3]"))
    check(proc)
    prof = run_dir / "profile"
    summary = json.loads((prof / "steps2-3.json").read_text())
    assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
    assert summary["gpu_busy_fraction"] is None            # CPU run: no kernels to time
    names = " ".join(r["name"] for r in summary["top_host_ops"])
    assert "aten::" in names                               # the model's ops were recorded
    assert json.loads((prof / "steps2-3.trace.json").read_text())["traceEvents"]
    assert "profiled steps 2-3" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]   # training went on


def test_profile_steps_past_the_run_is_an_error_and_a_resume_past_the_start_skips_it(tmp_path):
    proc = run(train_cmd(tmp_path / "run", "train.max_steps=3", "train.profile_steps=[2,5]"))
    assert proc.returncode != 0 and "ends after train.max_steps=3" in proc.stderr + proc.stdout
    # a pre-empted run restarted with its own config must not fail on a window it already passed
    check(run(train_cmd(tmp_path / "run", "train.max_steps=3", "train.profile_steps=[2,3]")))
    proc = run(train_cmd(tmp_path / "run", "train.max_steps=5", "train.profile_steps=[2,3]", "train.resume=auto"))
    check(proc)
    assert "starts at step 4, past the window's start; not profiling" in proc.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-2:] == [4, 5]


def test_a_profile_window_cut_short_is_still_written(tmp_path):
    import torch

    from megasparse.train.profiling import StepProfiler

    prof = StepProfiler([2, 4], str(tmp_path), torch.device("cpu"), is_main=True)
    prof.before_step(2)
    torch.ones(8).sum()
    prof.after_step(2)
    assert prof.close(2).endswith("steps2-2.md")            # the run stopped after step 2 of [2, 4]
    assert json.loads((tmp_path / "profile" / "steps2-2.json").read_text())["steps"] == 1
    assert prof.close(3) is None                             # closed once


def test_profile_busy_time_is_the_union_of_kernel_intervals():
    from megasparse.train.profiling import busy_ms

    assert busy_ms([(30, 40), (0, 10), (5, 20)]) == pytest.approx(0.030)   # µs in, ms out; overlap once
    assert busy_ms([]) == 0.0

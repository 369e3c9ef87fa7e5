"""optim.implementation: torch AdamW's fused / foreach / for-loop kernels give the same update."""
import pytest
import torch

from megasparse.config import ConfigError, OptimConfig
from megasparse.train.optimizer import adamw_implementation, build_optimizer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def test_auto_picks_foreach_on_cpu_and_each_name_maps_to_torch_keywords():
    model = _model()
    assert adamw_implementation(model, OptimConfig()) == {"foreach": True}
    assert adamw_implementation(model, OptimConfig(implementation="fused")) == {"fused": True}
    assert adamw_implementation(model, OptimConfig(implementation="for-loop")) == {"foreach": False}
    with pytest.raises(ConfigError, match="optim.implementation"):
        OptimConfig(implementation="apex")


def test_every_implementation_takes_the_same_steps():
    x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
    finals = {}
    for impl in ("for-loop", "foreach", "fused"):
        model = _model()
        opt = build_optimizer(model, OptimConfig(lr=1e-2, implementation=impl))
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        finals[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    ref = finals.pop("for-loop")
    assert not torch.equal(ref, torch.cat([p.detach().flatten() for p in _model().parameters()]))  # it trained
    for impl, got in finals.items():
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=impl)


_RESUMED_GROUPS = """
import json, sys
from megasparse.config import load_config
from megasparse.train.loop import Trainer
t = Trainer(load_config("configs/demo.yaml", sys.argv[1:]))
opt = t.lr_scheduler.optimizer
steps = [(str(s["step"].dtype), s["step"].device.type == p.device.type, float(s["step"]))
         for g in opt.param_groups for p in g["params"] for s in [opt.state[p]]]
print("GROUPS", json.dumps({"step": t.step, "flags": [[g.get("fused"), g.get("foreach")] for g in opt.param_groups],
                            "steps": sorted(set(map(tuple, steps)))}))
t.fit()
print("FINAL", t.step)
t.shutdown()
"""


@pytest.mark.slow
def test_resume_takes_the_kernels_from_the_config_not_the_checkpoint(tmp_path):
    """torch's load_state_dict restores the saved groups' fused/foreach flags; the run's
    optim.implementation must win, with the step counters where those kernels want them."""
    import json
    import sys

    from tests.trainer_utils import TINY, check, run, train_cmd

    check(run(train_cmd(tmp_path / "run", "train.max_steps=2", "optim.implementation=foreach")))
    # a foreach checkpoint resumed with fused, then that run's (fused) checkpoint with for-loop
    for impl, flags, step in (("fused", [True, None], 2), ("for-loop", [None, False], 3)):
        proc = run([sys.executable, "-c", _RESUMED_GROUPS, *TINY, f"train.run_dir={tmp_path / 'run'}",
                    f"train.max_steps={step + 1}", "train.save_interval=1000", "train.resume=auto",
                    f"optim.implementation={impl}"])
        check(proc)
        got = json.loads(proc.stdout.split("GROUPS ", 1)[1].splitlines()[0])
        assert got["step"] == step and all(f == flags for f in got["flags"]), (impl, got)
        assert got["steps"] == [["torch.float32", True, float(step)]], got   # where the kernel wants them
        assert f"FINAL {step + 1}" in proc.stdout                            # the chosen kernel took a step

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

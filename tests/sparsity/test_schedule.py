import math
from pathlib import Path

import pytest

from megasparse.config import SparsityConfig, load_config
from megasparse.errors import ConfigError
from megasparse.sparsity.schedule import L1Schedule, build_l1_schedule, ramp_value


def _sched(**kw):
    return build_l1_schedule(SparsityConfig(**kw))


def test_constant_is_the_default_and_keeps_l1_coeff():
    s = _sched(l1_coeff=0.02)
    assert isinstance(s, L1Schedule)
    assert [s.coeff(t) for t in (0, 1, 10**6)] == [0.02] * 3


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
def test_delay_ramp_then_constant(shape):
    s = _sched(schedule=shape, l1_start=0.001, l1_coeff=0.1, delay_steps=10, ramp_steps=100)
    assert s.coeff(0) == 0.0 and s.coeff(9) == 0.0            # delay: dense warm-up
    assert s.coeff(10) == pytest.approx(0.001)                  # ramp starts at lambda0
    assert s.coeff(110) == 0.1 and s.coeff(10**5) == 0.1        # then holds lambda1 = l1_coeff
    ramp = [s.coeff(t) for t in range(10, 111)]
    assert all(b >= a for a, b in zip(ramp, ramp[1:]))          # monotone
    mid = s.coeff(60)
    expected = {"linear": 0.001 + 0.099 * 0.5, "cosine": 0.001 + 0.099 * 0.5,
                "exponential": math.sqrt(0.001 * 0.1)}[shape]
    assert mid == pytest.approx(expected)


def test_ramp_shapes_differ_where_they_should():
    # cosine is flat at both ends; exponential grows by equal factors
    assert ramp_value("cosine", 0, 1, 0.1) < ramp_value("linear", 0, 1, 0.1)
    assert ramp_value("cosine", 0, 1, 0.9) > ramp_value("linear", 0, 1, 0.9)
    r = [ramp_value("exponential", 1e-4, 1e-2, t) for t in (0.0, 0.25, 0.5)]
    assert r[1] / r[0] == pytest.approx(r[2] / r[1])


def test_decreasing_ramp_is_allowed():
    s = _sched(schedule="linear", l1_start=0.2, l1_coeff=0.1, ramp_steps=10)
    assert s.coeff(0) == 0.2 and s.coeff(5) == pytest.approx(0.15) and s.coeff(10) == 0.1


@pytest.mark.parametrize("kw, words", [
    (dict(schedule="sigmoid"), "sparsity.schedule"),
    (dict(schedule="linear", ramp_steps=0), "ramp_steps > 0"),
    (dict(schedule="constant", ramp_steps=5), "has no effect"),
    (dict(schedule="exponential", ramp_steps=5, l1_coeff=0.1), "l1_start"),
    (dict(l1_coeff=-1.0), "l1_coeff"),
    (dict(delay_steps=-1), "delay_steps"),
    (dict(controller="pi"), "exactly one of"),
    (dict(controller="pi", target_nnz_fraction=0.01, target_nnz_per_token=7), "exactly one of"),
    (dict(target_nnz_fraction=0.01), "need a controller"),
    (dict(controller="pi", target_nnz_fraction=1.5), "(0, 1)"),
    (dict(controller="bang_bang", target_nnz_fraction=0.01), "sparsity.controller"),
    (dict(controller_smoothing=0.0), "controller_smoothing"),
    (dict(l1_min=1.0, l1_max=0.1), "l1_min"),
])
def test_bad_configs_name_the_key(kw, words):
    with pytest.raises(ConfigError, match=None) as err:
        SparsityConfig(**kw)
    assert words in str(err.value)


def test_unknown_sparsity_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sparsity:\n  l1_coef: 0.1\n")
    with pytest.raises(ConfigError, match="l1_coef"):
        load_config(str(path))


def test_demo_config_uses_a_ramp():
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"))
    assert cfg.sparsity.schedule != "constant" and cfg.sparsity.ramp_steps > 0 and cfg.sparsity.l1_coeff > 0


def test_state_round_trip():
    s = _sched(schedule="cosine", l1_coeff=0.1, ramp_steps=10)
    t = _sched(schedule="cosine", l1_coeff=0.1, ramp_steps=10)
    t.load_state_dict(s.state_dict())
    assert [s.coeff(i) for i in range(12)] == [t.coeff(i) for i in range(12)]

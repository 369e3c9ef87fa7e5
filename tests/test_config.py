import pytest

from megasparse.config import ConfigError, load_config, parse_overrides, resolve_batch, save_config


def test_demo_config_loads_and_names_run_dir():
    cfg = load_config("configs/demo.yaml")
    assert cfg.name == "demo"
    assert cfg.train.run_dir == "runs/demo"
    assert cfg.model.n_kv_heads == 2


def test_overrides_apply_with_types():
    cfg = load_config("configs/demo.yaml", ["train.max_steps=7", "optim.lr=1e-3", "parallel.zero_stage=2",
                                            "train.run_dir=/tmp/x", "sparsity.l1_coeff=0"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3 and cfg.parallel.zero_stage == 2
    assert cfg.train.run_dir == "/tmp/x" and cfg.sparsity.l1_coeff == 0.0
    assert isinstance(cfg.sparsity.l1_coeff, float)


def test_unknown_key_names_key_and_allowed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 128\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert "model.d_modle" in str(err.value) and "d_model" in str(err.value)


def test_unknown_section_and_override_typo():
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(None, ["trian.max_steps=3"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["train.max_steps"])


def test_wrong_type_is_reported():
    with pytest.raises(ConfigError, match="train.max_steps='ten'"):
        load_config(None, ["train.max_steps=ten"])


@pytest.mark.parametrize("override,needle", [
    (["model.n_heads=5"], "must divide model.d_model"),
    (["model.n_kv_heads=3"], "must divide model.n_heads"),
    (["parallel.zero_stage=4"], "parallel.zero_stage"),
    (["model.mlp=gelu"], "model.mlp"),
    (["data.seq_len=4096"], "exceeds model.max_seq_len"),
    (["parallel.tp=3"], "parallel.tp=3"),
    (["train.profile_steps=[5,2]"], "first <= last"),
    (["train.profile_steps=7"], "must be \\[first, last\\]"),
    (["train.profile_steps=[0,2]"], "profile_steps"),
    (["train.check_grad_overflow=false", "train.on_nonfinite=skip"], "needs train.on_nonfinite=stop"),
])
def test_invalid_combinations(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("configs/demo.yaml", override)


def test_batch_arithmetic():
    cfg = load_config("configs/demo.yaml", ["train.micro_batch_size=4", "train.global_batch_size=16"])
    plan = resolve_batch(cfg, world_size=2)
    assert (plan.dp, plan.grad_accum_steps) == (2, 2)
    cfg = load_config("configs/demo.yaml", ["train.micro_batch_size=4", "train.global_batch_size=16",
                                            "train.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match="!= train.global_batch_size=16"):
        resolve_batch(cfg, world_size=2)
    cfg = load_config("configs/demo.yaml", ["train.micro_batch_size=3", "train.global_batch_size=16"])
    with pytest.raises(ConfigError, match="not divisible"):
        resolve_batch(cfg, world_size=1)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/demo.yaml", ["train.max_steps=9"])
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    again = load_config(str(path))
    assert again.to_dict() == cfg.to_dict()

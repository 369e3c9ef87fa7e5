"""`megasparse export` and megasparse.inference: HF Llama compatibility, export-time neuron sorting
(twell n_hot), load_pretrained round trips, TP merging and clear errors.

Two real checkpoints come from the trainer (tp=1 relu_gated tied; tp=2 relu_gated untied with
replicated K/V); the swiglu and dead-neuron cases are hand-built checkpoint folders in the same
format (mp_rank_00_model_states.pt + megasparse.json), which costs no training.
"""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch

from megasparse.cli import main
from megasparse.config import Config, DataConfig, ModelConfig
from megasparse.errors import CheckpointError, ConfigError, DataError
from megasparse.export import export_checkpoint
from megasparse.inference import load_pretrained, load_tokenizer
from megasparse.model.transformer import SparseLlama
from tests.trainer_utils import check, run, torchrun_cmd, train_cmd

VOCAB = 512          # sentencepiece needs >= 300 pieces; 512 trains in well under a second
ARCH = ["model.d_model=64", "model.ffn_hidden=200", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=2",
        "train.max_steps=2", "train.global_batch_size=2", "train.micro_batch_size=2"]
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory):
    """tests/conftest.py's private cache, for the module-scoped fixtures (built before it applies)."""
    path = str(tmp_path_factory.getbasetemp() / "megasparse_cache")
    old = os.environ.get("MEGASPARSE_CACHE")
    os.environ["MEGASPARSE_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("MEGASPARSE_CACHE", None)
    else:
        os.environ["MEGASPARSE_CACHE"] = old


@pytest.fixture(scope="module")
def tokenizer(module_cache):
    from megasparse.data import demo_tokenizer
    return demo_tokenizer(VOCAB)


# ------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def tp1_relu(tmp_path_factory, tokenizer):
    run_dir = tmp_path_factory.mktemp("tp1") / "run"
    check(run(train_cmd(run_dir, *ARCH, "model.tie_embeddings=true")))
    return run_dir / "checkpoints"


@pytest.fixture(scope="module")
def tp2_relu(tmp_path_factory, tokenizer):
    run_dir = tmp_path_factory.mktemp("tp2") / "run"
    check(run(torchrun_cmd(2, run_dir, *ARCH, "parallel.tp=2", "model.tie_embeddings=false")))
    return run_dir / "checkpoints"


def hand_built(root, tokenizer, seed=0, step=7, tokenizer_hash="match", edit=None, **model):
    """A tp=1 checkpoint folder in the trainer's format, from a freshly initialised model."""
    kw = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=200, max_seq_len=32)
    cfg = ModelConfig(**{**kw, **model})
    torch.manual_seed(seed)
    net = SparseLlama(cfg)
    state = net.state_dict()
    if edit is not None:
        edit(state)
    folder = os.path.join(root, f"step{step:08d}")
    os.makedirs(folder)
    config = Config(model=cfg, data=DataConfig(tokenizer=tokenizer.path, seq_len=32)).to_dict()
    torch.save({"module": state, "config": config}, os.path.join(folder, "mp_rank_00_model_states.pt"))
    meta = {"step": step, "tp": 1, "dp": 1, "zero_stage": 1, "shards": {}, "config": config,
            "tokenizer_hash": tokenizer.sha256 if tokenizer_hash == "match" else tokenizer_hash}
    with open(os.path.join(folder, "megasparse.json"), "w") as fh:
        json.dump(meta, fh)
    with open(os.path.join(root, "latest"), "w") as fh:
        fh.write(os.path.basename(folder))
    return root


def reference_model(ckpt_dir) -> SparseLlama:
    """The checkpoint's model built the plain way (constructor + load_state_dict of tp=1 files)."""
    from megasparse.config import config_from_dict
    from megasparse.train.checkpoint import read_latest

    folder = os.path.join(ckpt_dir, read_latest(str(ckpt_dir)))
    with open(os.path.join(folder, "megasparse.json")) as fh:
        meta = json.load(fh)
    assert meta["tp"] == 1
    cfg = config_from_dict(meta["config"]).model
    cfg.mlp_backend = "torch"
    model = SparseLlama(cfg)
    saved = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), weights_only=False)
    model.load_state_dict(saved["module"])
    return model.float().eval()


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory, tokenizer):
    """A `megasparse data preprocess` folder written with the format's own ShardWriter (the real
    preprocess spends ~5 s importing and running `datasets`): real Shakespeare text."""
    from megasparse.data.bundled import read_bundled_documents
    from megasparse.data.shards import (FORMAT, TOKENIZER_FILE, VERSION, ShardWriter, token_dtype,
                                        write_metadata)

    out = tmp_path_factory.mktemp("calib") / "tokens"
    os.makedirs(out)
    docs = [d.text[:30000] for d in read_bundled_documents()[:3]]
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {}
    for split, texts in (("train", docs[:2]), ("valid", docs[2:])):
        writer = ShardWriter(str(out), split, dtype, 1 << 20)
        for text in texts:
            ids = tokenizer.encode(text) + [tokenizer.eos_id]
            writer.write(np.asarray(ids), np.asarray([len(ids)]))
        splits[split] = writer.finish()
    shutil.copyfile(tokenizer.path, out / TOKENIZER_FILE)
    write_metadata(str(out), {"format": FORMAT, "version": VERSION, "tokenizer_sha256": tokenizer.sha256,
                              "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "eos_id": tokenizer.eos_id,
                              "splits": splits})
    assert splits["valid"]["num_tokens"] >= 8192
    return out


def calibration_tokens(path, n=8192, seq=32):
    from megasparse.data.shards import open_preprocessed
    stream = open_preprocessed(str(path)).splits["valid"]
    return torch.from_numpy(stream.read(0, n).astype(np.int64)).view(-1, seq)


def fire_counts(model, tokens):
    with torch.no_grad():
        return [c.long() for c in model(tokens).fire_counts]


def hf_logits(out, ids):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(out)).float().eval()
    with torch.no_grad():
        return hf(ids).logits


def ids(vocab=VOCAB, seed=0):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def our_logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ------------------------------------------------------------------ HF compatibility

def _tp2_as_tp1(tp2_relu, tmp_path):
    from megasparse.train.convert import convert
    convert(str(tp2_relu), str(tmp_path / "tp1"), 1, weights_only=True)
    return tmp_path / "tp1"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp1_relu_tied", "tp2_relu_untied", "swiglu_tied", "swiglu_untied"])
def test_hf_llama_gives_the_same_logits(case, request, tmp_path, tokenizer):
    if case.startswith("tp1"):
        ckpt = request.getfixturevalue("tp1_relu")
        ref = reference_model(ckpt)
    elif case.startswith("tp2"):
        ckpt = request.getfixturevalue("tp2_relu")
        ref = reference_model(_tp2_as_tp1(ckpt, tmp_path))
    else:
        ckpt = hand_built(tmp_path / "ckpt", tokenizer, mlp="swiglu", tie_embeddings=case.endswith("_tied"))
        ref = reference_model(ckpt)
    out = tmp_path / "hf"
    result = export_checkpoint(str(ckpt), str(out), **QUIET)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_act"] == ("silu" if "swiglu" in case else "relu")
    assert config["tie_word_embeddings"] is case.endswith("_tied")
    assert config["num_key_value_heads"] == 1 and config["head_dim"] == 32 and config["intermediate_size"] == 200
    assert config["megasparse"]["calibration"] is None and config["megasparse"]["neuron_order"] == "as_trained"
    assert config["megasparse"]["source_step"] == result.step
    assert (out / "tokenizer.model").read_bytes() == open(tokenizer.path, "rb").read()
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) is not case.endswith("_tied")
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.self_attn.k_proj.weight", "model.layers.0.post_attention_layernorm.weight"} <= names
    x = ids()
    expected = our_logits(ref, x)
    torch.testing.assert_close(hf_logits(out, x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_logits(load_pretrained(str(out), mlp_backend="torch"), x), expected,
                               rtol=0, atol=0)
    assert load_tokenizer(str(out)).get_piece_size() == VOCAB


# ------------------------------------------------------------------ export-time calibration

@pytest.mark.slow
def test_calibration_sorts_neurons_by_fires_and_keeps_the_function(tp1_relu, calibration_dir, tmp_path):
    import kernels.twell as twell

    ref = reference_model(tp1_relu)
    tokens = calibration_tokens(calibration_dir)
    fires = fire_counts(ref, tokens)
    out = tmp_path / "hf"
    assert main(["export", str(tp1_relu), str(out), "--calibration-data", str(calibration_dir), "--device", "cpu"]) == 0
    config = json.loads((out / "config.json").read_text())
    cal = config["megasparse"]["calibration"]
    assert config["megasparse"]["neuron_order"] == "by_fire_count"
    assert cal["tokens"] == 8192 and cal["split"] == "valid" and cal["seq_len"] == 32 and cal["twell_tile"] == 128
    model = load_pretrained(str(out), mlp_backend="torch")
    sorted_fires = fire_counts(model, tokens)
    for i, (before, after) in enumerate(zip(fires, sorted_fires)):
        assert torch.equal(after, before.sort(descending=True).values), i     # popular first, same counts
        layer = cal["layers"][i]
        assert layer["never_fired"] == int((before == 0).sum())
        assert layer["nnz_per_token"] == pytest.approx(float(before.sum()) / 8192, abs=1e-3)
        wg, wu, wd = (getattr(ref.layers[i].mlp, n).detach() for n in ("gate_weight", "up_weight", "down_weight"))
        want = twell.calibrate(twell.prepare_weights(wg, wu, wd), before.int(), 8192).n_hot
        assert layer["twell_n_hot"] == want and want % 128 == 0 and want <= 200
        assert model.layers[i].mlp._twell_layout.preset_n_hot == want
    x = ids()
    torch.testing.assert_close(hf_logits(out, x), our_logits(ref, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_logits(model, x), our_logits(ref, x), rtol=1e-5, atol=1e-5)
    serving = load_pretrained(str(out), mlp_backend="torch", track_stats=False)   # y only, same logits
    assert all(c is None for c in serving(x).fire_counts)
    torch.testing.assert_close(our_logits(serving, x), our_logits(model, x))


def test_calibration_counts_dead_neurons(tmp_path, tokenizer, calibration_dir):
    """Layer 0: 150 of 200 gate rows zeroed (never fire, sorted last); layer 1: all dead (n_hot 0)."""
    def kill(state):
        dead = torch.ones(200, dtype=torch.bool)
        dead[torch.randperm(200, generator=torch.Generator().manual_seed(3))[:50]] = False
        state["layers.0.mlp.gate_weight"][dead] = 0.0
        state["layers.1.mlp.gate_weight"].zero_()
    ckpt = hand_built(tmp_path / "ckpt", tokenizer, edit=kill, tie_embeddings=False)
    out = tmp_path / "hf"
    result = export_checkpoint(str(ckpt), str(out), calibration_data=str(calibration_dir), calibration_tokens=1000,
                               device="cpu", **QUIET)
    cal = result.calibration
    assert cal["tokens"] == 1000      # 31 sequences of 32 and one of 8
    assert cal["layers"][0]["never_fired"] >= 150 and cal["layers"][1] == {
        "layer": 1, "twell_n_hot": 0, "nnz_per_token": 0.0, "never_fired": 200}
    assert cal["layers"][0]["twell_n_hot"] == 128     # <= 50 popular neurons, rounded up to a tile
    from safetensors.torch import load_file
    gate = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    alive = gate.abs().sum(1) > 0
    assert alive[:50].all() and not alive[50:].any()    # the dead rows went to the end
    ref, model = reference_model(ckpt), load_pretrained(str(out))
    torch.testing.assert_close(our_logits(model, ids()), our_logits(ref, ids()), rtol=1e-5, atol=1e-5)


def test_preset_layout_uses_the_recorded_n_hot(tmp_path, tokenizer, calibration_dir):
    """load_pretrained presets each sparse layer's TwELL layout: final from its first call, the first
    n_hot neurons dense in their stored order (the kernels run under the Triton interpreter)."""
    from megasparse.model.sparse_mlp import torch_gated_mlp
    from megasparse.model.twell_layout import TwellLayout

    ckpt = hand_built(tmp_path / "ckpt", tokenizer)
    export_checkpoint(str(ckpt), str(tmp_path / "hf"), calibration_data=str(calibration_dir),
                      calibration_tokens=512, device="cpu", **QUIET)
    model = load_pretrained(str(tmp_path / "hf"))
    mlp = model.layers[0].mlp
    layout = mlp._twell_layout
    assert layout.preset_n_hot == 128
    ws = [mlp.gate_weight.detach(), mlp.up_weight.detach(), mlp.down_weight.detach()]
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    y = layout(x, *ws)
    assert layout.final and layout.weights.n_hot == 128 and layout.tokens_seen == 0
    assert torch.equal(layout.weights.perm, torch.arange(200))
    torch.testing.assert_close(y, torch_gated_mlp(x, *ws).y, rtol=1e-4, atol=1e-5)
    # an uncalibrated export presets nothing; a bad preset is refused with the tile in the message
    export_checkpoint(str(ckpt), str(tmp_path / "plain"), **QUIET)
    assert load_pretrained(str(tmp_path / "plain")).layers[0].mlp._twell_layout.preset_n_hot is None
    with pytest.raises(ValueError, match="multiple of the twell tile 128"):
        TwellLayout(preset_n_hot=64)(x, *ws)
    with pytest.raises(ValueError, match="non-negative"):
        TwellLayout().preset_hot(-128)


# ------------------------------------------------------------------ tensor parallelism

@pytest.mark.slow
def test_tp2_checkpoint_exports_the_same_weights_as_tp1(tp2_relu, tmp_path, calibration_dir):
    from safetensors.torch import load_file

    tp1 = _tp2_as_tp1(tp2_relu, tmp_path)
    for name, src in (("a", tp2_relu), ("b", tp1)):
        export_checkpoint(str(src), str(tmp_path / name), calibration_data=str(calibration_dir),
                          calibration_tokens=2048, **QUIET)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and "lm_head.weight" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ca, cb = (json.loads((tmp_path / n / "config.json").read_text())["megasparse"] for n in "ab")
    assert ca["source_tp"] == 2 and cb["source_tp"] == 1
    assert ca["calibration"]["layers"] == cb["calibration"]["layers"]


# ------------------------------------------------------------------ bad input

def test_bad_inputs_are_clear_errors(tmp_path, tokenizer, calibration_dir, capsys):
    ckpt = hand_built(tmp_path / "ckpt", tokenizer)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(str(tmp_path / "nope"), str(out), **QUIET)
    assert main(["export", str(tmp_path / "nope"), str(out)]) == 2
    assert "megasparse: error: checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="neither 'latest' nor 'megasparse.json'"):
        export_checkpoint(str(tmp_path), str(out), **QUIET)
    with pytest.raises(DataError, match="--calibration-data .*does not exist"):
        export_checkpoint(str(ckpt), str(out), calibration_data=str(tmp_path / "nodata"), **QUIET)
    from megasparse.data import demo_tokenizer
    other = demo_tokenizer(400)
    with pytest.raises(DataError, match=r"sha256 .* pass --tokenizer"):
        export_checkpoint(str(ckpt), str(out), tokenizer=other.path, **QUIET)
    swiglu = hand_built(tmp_path / "swiglu", tokenizer, mlp="swiglu")
    with pytest.raises(ConfigError, match="model.mlp=swiglu .* without --calibration-data"):
        export_checkpoint(str(swiglu), str(out), calibration_data=str(calibration_dir), **QUIET)
    small = hand_built(tmp_path / "small", tokenizer, vocab_size=400, tokenizer_hash=None)
    with pytest.raises(DataError, match="vocab size 512 > the model's vocab_size 400"):
        export_checkpoint(str(small), str(out), **QUIET)
    assert not out.exists()
    # an existing OUT_DIR is kept unless --overwrite
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="--overwrite"):
        export_checkpoint(str(ckpt), str(out), **QUIET)
    assert (out / "keep.txt").exists()
    export_checkpoint(str(ckpt), str(out), overwrite=True, **QUIET)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
    # non-finite weights, in the checkpoint or from a cast to fp16
    nan = hand_built(tmp_path / "nan", tokenizer, edit=lambda st: st["layers.1.mlp.up_weight"].view(-1)[5].fill_(
        float("nan")))
    with pytest.raises(CheckpointError, match="layers.1.mlp.up_weight holds NaN or inf.*earlier step folder"):
        export_checkpoint(str(nan), str(tmp_path / "o1"), **QUIET)
    big = hand_built(tmp_path / "big", tokenizer, edit=lambda st: st["norm.weight"].fill_(1e5))
    with pytest.raises(CheckpointError, match="model.norm.weight exceeds the range of float16.*--dtype bf16"):
        export_checkpoint(str(big), str(tmp_path / "o1"), dtype="fp16", **QUIET)
    export_checkpoint(str(big), str(tmp_path / "o1"), dtype="bf16", **QUIET)
    # a step folder without model files
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    os.remove(broken / "step00000007" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="holds no model files"):
        export_checkpoint(str(broken), str(tmp_path / "o2"), **QUIET)


def test_failed_export_leaves_no_out_dir(tmp_path, tokenizer, monkeypatch):
    import megasparse.export.writer as writer

    ckpt = hand_built(tmp_path / "ckpt", tokenizer)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(writer.shutil, "copyfile", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"), **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]        # no OUT_DIR, no OUT_DIR.tmp-<pid>


def test_load_errors_are_clear(tmp_path, tokenizer):
    ckpt = hand_built(tmp_path / "ckpt", tokenizer)
    out = tmp_path / "hf"
    export_checkpoint(str(ckpt), str(out), **QUIET)
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        load_pretrained(str(tmp_path / "ckpt"))
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(str(out))
    os.remove(weights)
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        load_pretrained(str(out))
    tok = out / "tokenizer.model"
    good = tok.read_bytes()
    tok.write_bytes(good + b"\0")          # another tokenizer: not the one config.json records
    with pytest.raises(DataError, match="exported with a tokenizer of sha256"):
        load_tokenizer(str(out))
    tok.write_bytes(good)
    assert load_tokenizer(str(out)).get_piece_size() == VOCAB
    os.remove(tok)
    with pytest.raises(DataError, match="tokenizer.model does not exist"):
        load_tokenizer(str(out))


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(rope_theta=40000.0, rope_parameters={"rope_type": "default", "rope_theta": 40000.0}),
     "rope_theta=40000.0, but its megasparse.model section says 10000"),
    (lambda c: c.update(hidden_act="silu"), "mlp='swiglu', but its megasparse.model section says 'relu_gated'"),
    (lambda c: c["megasparse"]["model"].update(qk_norm=True), r"does not know: \['qk_norm'\]"),
    (lambda c: c["megasparse"].update(format_version=99), "format_version=99, newer than"),
])
def test_config_sections_that_disagree_are_refused(tmp_path, tokenizer, edit, message):
    """transformers reads the HF fields and keeps our section when it re-saves a folder: an edit
    on one side must not load as another model without a word."""
    out = tmp_path / "hf"
    export_checkpoint(str(hand_built(tmp_path / "ckpt", tokenizer)), str(out), **QUIET)
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_pretrained(str(out))


def test_tied_config_with_a_different_lm_head_is_refused():
    from megasparse.export.hf_format import from_hf_names

    embed = torch.randn(8, 4)
    tensors = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(4)}
    assert set(from_hf_names({**tensors, "lm_head.weight": embed.clone()}, "relu_gated", True, "x")) == \
        {"embed.weight", "norm.weight"}                                  # equal: tied, dropped
    with pytest.raises(CheckpointError, match="tie_word_embeddings=true but stores an lm_head.weight that differs"):
        from_hf_names({**tensors, "lm_head.weight": embed + 1}, "relu_gated", True, "x")


def test_a_failed_publish_puts_the_previous_export_back(tmp_path, monkeypatch):
    import megasparse.export.writer as writer

    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "config.json").write_text("old")
    new.mkdir()
    real = os.replace

    def second_rename_fails(src, dst):
        if str(src) == str(new):
            raise OSError(5, "Input/output error")
        real(src, dst)
    monkeypatch.setattr(writer.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="Input/output error"):
        writer._publish(str(new), str(out))
    assert (out / "config.json").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["new", "out"]


def test_plain_hf_llama_loads(tmp_path):
    """A Llama saved by transformers itself (no megasparse section) loads from the HF fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=200, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, hidden_act="relu",
                                      max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False))
    hf.save_pretrained(str(tmp_path / "hf"))
    model = load_pretrained(str(tmp_path / "hf"))
    assert model.cfg.mlp == "relu_gated" and model.cfg.n_kv_heads == 1 and model.cfg.norm_eps == 1e-5
    x = ids(300)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf.eval()(x).logits, rtol=1e-5, atol=1e-5)
    assert glob.glob(str(tmp_path / "hf" / "*.safetensors"))

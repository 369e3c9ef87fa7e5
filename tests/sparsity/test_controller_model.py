"""The controller closing the loop on a real (tiny) sparse Llama, trained on CPU with plain AdamW,
with the trainer's sequence: stats per micro-batch, reduce and observe at log intervals."""
import torch

from megasparse.config import ModelConfig, SparsityConfig
from megasparse.model.transformer import SparseLlama
from megasparse.sparsity.schedule import build_l1_schedule
from megasparse.sparsity.stats import SparsityStats

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=128, max_seq_len=32, mlp_backend="torch")
TARGET = 0.05  # of H


def _data(step, gen):
    # A learnable stream: each sequence counts up from a random start (mod vocab).
    start = torch.randint(0, CFG.vocab_size, (8, 1), generator=gen)
    seqs = (start + torch.arange(33)) % CFG.vocab_size
    return seqs[:, :-1], seqs[:, 1:]


def test_controller_reaches_target_on_a_tiny_model():
    torch.set_flush_denormal(True)  # as the trainer does: L1 makes denormals, which are ~10x slower
    try:
        _closed_loop()
    finally:
        torch.set_flush_denormal(False)  # process-wide: do not leak it into other tests


def _closed_loop():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = SparseLlama(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = build_l1_schedule(SparsityConfig(controller="pi", target_nnz_fraction=TARGET, l1_coeff=0.01,
                                             schedule="linear", delay_steps=10, ramp_steps=40), CFG.ffn_hidden)
    stats = SparsityStats(CFG.n_layers, CFG.ffn_hidden, CFG.ffn_hidden, torch.device("cpu"))
    measured = []
    for step in range(400):
        inputs, labels = _data(step, gen)
        out = model(inputs, labels)
        loss = out.ce_loss + sched.coeff(step) * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats.update(out.fire_counts, out.l1_per_layer, out.tokens)
        if (step + 1) % 5 == 0:
            rec = stats.reduce_and_reset()
            extra = sched.observe(step + 1, rec)
            measured.append(rec["nnz_per_token"] / CFG.ffn_hidden)
            assert extra["nnz_target"] == TARGET * CFG.ffn_hidden
    tail = measured[-20:]  # the last 100 steps, smoothed over 4 log intervals
    smooth = [sum(tail[i:i + 4]) / 4 for i in range(len(tail) - 3)]
    assert all(abs(v / TARGET - 1) < 0.15 for v in smooth), smooth
    assert torch.isfinite(loss)

"""`megasparse report RUN_DIR` on a synthetic run directory."""
import json

import numpy as np

from megasparse.cli import main
from megasparse.sparsity.firing import list_firing_files, load_firing_rates, save_firing_rates


def _fake_run(run_dir, n_layers=3, hidden=32):
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for step in range(10, 110, 10):
            nnz = [hidden * 0.5 / (1 + step / 20) * (1 + i) for i in range(n_layers)]
            rec = {"split": "train", "step": step, "loss": 5 - step / 100, "ce_loss": 4.9 - step / 100,
                   "l1_coeff": 0.001 * step, "nnz_per_token": sum(nnz) / n_layers, "nnz_per_token_layer": nnz,
                   "nnz_fraction_layer": [v / hidden for v in nnz], "nnz_max_layer": [2 * v for v in nnz],
                   "nnz_max": 2 * max(nnz), "dead_fraction_layer": [0.01 * step / 10] * n_layers,
                   "dead_fraction": 0.01 * step / 10, "l1_layer": [1.0] * n_layers, "nnz_target": 3.0}
            fh.write(json.dumps(rec) + "\n")
            if step % 50 == 0:
                fh.write(json.dumps({"split": "valid", "step": step, "val_loss": 5.1 - step / 100}) + "\n")
    rates = np.random.default_rng(0).random((n_layers, hidden)) ** 4
    rates[:, :3] = 0.0
    save_firing_rates(str(run_dir), 50, rates * 0.5, window_tokens=1000)
    save_firing_rates(str(run_dir), 100, rates, window_tokens=1000)
    return rates


def test_report_writes_plots_histogram_and_summary(tmp_path, capsys):
    rates = _fake_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = tmp_path / "report"
    for name in ("loss.png", "lambda.png", "nnz_per_token.png", "dead_fraction.png", "firing_rates_hist.png"):
        assert (out / name).stat().st_size > 1000, name
    summary = (out / "summary.md").read_text()
    assert "| val loss | 4.1 |" in summary and "| nnz target | 3 |" in summary
    assert summary.count("\n| 2 |") == 1  # one row per layer
    # The histogram uses the newest firing file.
    assert [s for s, _ in list_firing_files(str(tmp_path))] == [50, 100]
    assert np.allclose(load_firing_rates(list_firing_files(str(tmp_path))[-1][1])["rates"], rates)


def test_report_on_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err

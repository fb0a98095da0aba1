"""The full reference: the default config (the seed's hyperparameters) trained 3 epochs on CPU.

The recipe's final test accuracy moves by about half a point with the seed or any change of numerics,
measured here (2-core AMD EPYC, test accuracy after epochs 1, 2, 3): foreach Adam seed 0 96.12, 96.49,
97.42; foreach Adam seed 1 95.23, 97.04, 96.56; fused Adam seed 0 96.12, 96.47, 96.90. The seed
notebook's own loop ended at 95.59-97.53%. So the bar is 96.5%: every such run clears it, and a run that
does not learn (or learns wrongly) does not. About 2 minutes here on 2 cores.
"""

from __future__ import annotations

import json

from tests.helpers import counts, distrnn


def test_default_config_reaches_the_seed_accuracy(tmp_path, data_dir):
    out = tmp_path / "reference"
    result = distrnn("train", "--mode", "cpu", "--config", "default", "--data-dir", str(data_dir),
                     "--output-dir", str(out), "--no-wandb", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["train_seen"], summary["test_seen"]) == (60_000, 10_000)
    assert summary["steps"] == 3 * 938  # ceil(60000 / 64) per epoch
    assert summary["test_accuracy"] >= 96.5, summary
    assert counts(result.stdout)[-1] == (summary["test_correct"], 10_000)
    assert not (out / "wandb").exists()  # --no-wandb

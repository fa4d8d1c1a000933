"""The demo learns: a short run of the README's demo config on the demo set, well above chance."""
import json

import pytest

from test_train import run, train_cmd


@pytest.mark.slow
def test_demo_config_learns_quickly(demo_shards, tmp_path):
    run_dir = tmp_path / "demo"
    # One epoch of 200 steps (the demo runs 3 of 250); chance is SRCC 0 +- 0.07 on 200 test images.
    out = run(train_cmd(["--config", "configs/demo.yaml", "--dataset", str(demo_shards),
                         "--run_dir", str(run_dir), "--epochs", "1", "--max_steps_per_epoch", "200",
                         "--no_plots"]), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["srcc"] > 0.25, results["test"]

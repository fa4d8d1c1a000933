"""DeepSpeed ZeRO-2 and ZeRO-3 through Accelerate and our own entry point, on two CPU ranks."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iqa_dist.checkpoint import as_fp32
from test_train import REPO, machinery_args
from conftest import free_port

# DeepSpeed compiles its shared-memory all-reduce on first use (about a minute): cache it.
EXTENSIONS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iqa_dist" / "torch_extensions"


def deepspeed_run(stage: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / f"launch/zero{stage}.yaml"), "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "iqa_dist.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(EXTENSIONS))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


@pytest.fixture(autouse=True)
def no_shared_memory_left():
    """DeepSpeed's CPU all-reduce leaves its buffers in /dev/shm: remove the ones this test
    made, never another user's or run's."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    yield
    for f in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before:
        f.unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", [(2, "no"), (3, "bf16")])
def test_zero_trains_selects_tests_and_resumes(small_shards, tmp_path, stage, precision):
    """ZeRO-3 shards the parameters too: the final test loads the best weights into them.
    Under bf16 DeepSpeed casts the model itself; ``best`` still holds float32 weights."""
    run_dir = tmp_path / f"zero{stage}"
    args = machinery_args(small_shards, run_dir, "--workers", "0", "--mixed_precision", precision)
    first = deepspeed_run(stage, args + ["--epochs", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last"
    assert (last / "pytorch_model").is_dir()  # DeepSpeed's own sharded checkpoint, not DDP's
    assert json.loads((run_dir / "results.json").read_text())["world_size"] == 2
    steps = json.loads((last / "trainer.json").read_text())["global_step"]

    second = deepspeed_run(stage, args + ["--epochs", "2", "--resume", "latest"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at epoch 2" in second.stdout
    state = json.loads((run_dir / "checkpoints" / "last" / "trainer.json").read_text())
    assert state["epoch"] == 2 and state["global_step"] == 2 * steps > 0
    best = load_file(str(run_dir / "checkpoints" / "best" / "model.safetensors"))
    assert all(t.numel() for t in best.values())  # whole tensors, not ZeRO-3's empty shards
    assert {t.dtype for t in best.values() if t.is_floating_point()} == {torch.float32}
    results = json.loads((run_dir / "results.json").read_text())
    assert math.isfinite(results["test"]["srcc"]) and results["epochs_run"] == 2


def test_reduces_gradients_in_fp32_and_best_weights_are_fp32():
    for stage in (2, 3):
        assert json.loads((REPO / f"launch/ds_zero{stage}.json").read_text())["communication_data_type"] == "fp32"
    weights = {"w": torch.ones(2, dtype=torch.bfloat16), "index": torch.arange(3)}
    cast = as_fp32(weights)
    assert (cast["w"].dtype, cast["index"].dtype) == (torch.float32, torch.int64)
    assert torch.equal(cast["w"], torch.ones(2)) and cast["index"] is weights["index"]

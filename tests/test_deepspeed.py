"""DeepSpeed ZeRO-2 through Accelerate and our own entry point, on two CPU ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import REPO, machinery_args

# DeepSpeed compiles its shared-memory all-reduce on first use (about a minute): cache it.
EXTENSIONS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iqa_dist" / "torch_extensions"


def zero2(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch/zero2.yaml"), "--num_processes", "2", "--main_process_port", "29551",
           "-m", "iqa_dist.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(EXTENSIONS))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


@pytest.fixture(autouse=True)
def no_shared_memory_left():
    yield
    for f in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        f.unlink(missing_ok=True)


@pytest.mark.slow
def test_zero2_trains_checkpoints_and_resumes(small_shards, tmp_path):
    run_dir = tmp_path / "zero2"
    args = machinery_args(small_shards, run_dir, "--workers", "0")  # later flags win
    first = zero2(args + ["--epochs", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last"
    assert (last / "pytorch_model").is_dir()  # DeepSpeed's own sharded checkpoint, not DDP's
    assert json.loads((run_dir / "results.json").read_text())["world_size"] == 2
    steps = json.loads((last / "trainer.json").read_text())["global_step"]

    second = zero2(args + ["--epochs", "2", "--resume", "latest"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at epoch 2" in second.stdout
    state = json.loads((run_dir / "checkpoints" / "last" / "trainer.json").read_text())
    assert state["epoch"] == 2 and state["global_step"] == 2 * steps > 0
    assert (run_dir / "checkpoints" / "best" / "model.safetensors").exists()

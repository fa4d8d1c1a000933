"""What the training loop feeds its steps on two ranks: each image's patches once per
epoch, split between the ranks, reshuffled every epoch."""
from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from conftest import free_port
from iqa_dist.data.stream import load_split
from test_train import MACHINERY, REPO, machinery_args, run


@pytest.mark.slow
def test_two_ranks_train_on_disjoint_patches_of_every_image_reshuffled_each_epoch(small_shards, tmp_path):
    # 12 train images x 2 patches = 24 = 3 steps x 2 ranks x batch 4: whole images per rank
    args = machinery_args(small_shards, tmp_path / "run", "--epochs", "2")
    out = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               str(REPO / "tests" / "record_keys.py"), str(tmp_path), *args])
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"keys-rank-{r}.json").read_text()) for r in (0, 1)]
    train = load_split(small_shards, "train").keys
    assert len(train) * MACHINERY["train_patch_num"] == 2 * 3 * MACHINERY["batch_size"]
    for epoch in (0, 1):
        first, second = ranks[0][epoch], ranks[1][epoch]
        assert len(first) == len(second) == 3 * MACHINERY["batch_size"]  # every step of the epoch
        assert not set(first) & set(second)
        assert Counter(first + second) == {key: MACHINERY["train_patch_num"] for key in train}
    for keys in ranks:
        assert keys[0] != keys[1]  # another order, or other images, in epoch 2

"""The patch stream: decode once, disjoint readers, equal batch counts, exact replay."""
from collections import Counter

import numpy as np
import pytest
import torch

from iqa_dist.config import ConfigError
from iqa_dist.data import stream
from iqa_dist.data.stream import (EvalPatches, TrainPatches, _samples, _virtual_shards, eval_loader,
                                  grid_positions, load_split, steps_per_epoch, train_loader)


def _keys_of_slot(split, slot, slots):
    pieces = _virtual_shards(split.shards, slots)[slot::slots]
    return [k for piece in pieces for k, _, _ in _samples(piece, split.keys)]


@pytest.mark.parametrize("slots", [2, 4, 12])  # 12 > shards: shards are cut into pieces
def test_readers_get_disjoint_samples_covering_the_split(small_shards, slots):
    split = load_split(small_shards, "train")
    assert len(split.shards) < 12
    per_slot = [_keys_of_slot(split, s, slots) for s in range(slots)]
    everything = [k for keys in per_slot for k in keys]
    assert sorted(everything) == sorted(split.keys)  # each image exactly once


def test_two_ranks_two_workers_give_equal_batch_counts(small_shards):
    split = load_split(small_shards, "train")
    steps = steps_per_epoch(split, patch_num=4, batch_size=4, world=2)
    counts = []
    for rank in range(2):
        loader = train_loader(split, patch_num=4, patch_size=224, batch_size=4, seed=1, rank=rank,
                              world=2, workers=2, shuffle_buffer=8)
        batches = [b for _, b in zip(range(steps + 3), loader)]  # more than an epoch: streams cycle
        counts.append(len(batches))
        assert all(x.shape == (4, 3, 224, 224) and y.shape == (4,) for x, y in batches)
    assert counts == [steps + 3, steps + 3]


def test_each_image_is_decoded_once_per_visit(small_shards, monkeypatch):
    split = load_split(small_shards, "train")
    decoded = Counter()
    real = stream.open_rgb

    def counting(data, where):
        decoded[where] += 1
        return real(data, where)

    monkeypatch.setattr(stream, "open_rgb", counting)
    patch_num = 6
    ds = TrainPatches(split, patch_num, 224, batch_size=3, seed=0, rank=0, world=1, shuffle_buffer=3)
    n_batches = len(split) * patch_num // 3 - 2  # less than one pass (the buffer holds some back)
    for _ in zip(range(n_batches), iter(ds)):
        pass
    assert decoded and max(decoded.values()) == 1
    assert sum(decoded.values()) <= len(split)


def test_epoch_replays_exactly_and_differs_across_epochs_and_ranks(small_shards):
    split = load_split(small_shards, "train")

    def first(rank, epoch):
        ds = TrainPatches(split, 4, 224, batch_size=4, seed=3, rank=rank, world=2, shuffle_buffer=8)
        ds.set_epoch(epoch)
        return next(iter(ds))

    a, b = first(0, 0), first(0, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], first(0, 1)[0])
    assert not torch.equal(a[0], first(1, 0)[0])


def test_patches_are_normalised_and_flipped(small_shards):
    split = load_split(small_shards, "train")
    x, _ = next(iter(TrainPatches(split, 8, 224, batch_size=16, seed=0, rank=0, world=1, shuffle_buffer=16)))
    assert x.dtype == torch.float32 and -2.2 < x.min() < -1.5 and 2.0 < x.max() < 2.7  # ImageNet stats


def test_evaluation_covers_every_image_once_across_ranks(small_shards):
    split = load_split(small_shards, "all")
    seen = {}
    for rank in range(2):
        loader = eval_loader(split, patch_num=5, patch_size=224, batch_size=7, rank=rank, world=2, workers=2)
        keys = Counter(k for _, _, ks in loader for k in ks)
        assert set(keys.values()) <= {5}
        assert not set(keys) & set(seen)
        seen.update(keys)
    assert set(seen) == split.keys


def test_evaluation_crops_are_deterministic(small_shards):
    split = load_split(small_shards, "test")
    for random_crop in (False, True):
        ds = EvalPatches(split, 4, 224, 64, rank=0, world=1, random_crop=random_crop, seed=5)
        a, b = next(iter(ds)), next(iter(ds))
        assert torch.equal(a[0], b[0]) and a[2] == b[2]


def test_grid_spreads_crops_over_the_image():
    corners = grid_positions(400, 600, 224, 9)
    assert len(set(corners)) == 9
    assert (0, 0) in corners and (400 - 224, 600 - 224) in corners


def test_split_rounds_differ_and_unknown_round_is_a_clear_error(small_shards):
    assert load_split(small_shards, "test", 0).keys != load_split(small_shards, "test", 1).keys
    with pytest.raises(ConfigError, match="no split round 5"):
        load_split(small_shards, "test", 5)

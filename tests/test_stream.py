"""The patch stream: decode once, disjoint readers, equal batch counts, exact replay."""
import gc
import io
import pickle
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iqa_dist.config import ConfigError
from iqa_dist.images import encode_png
from iqa_dist.data import handover, stream
from iqa_dist.data.manifest import read_manifest
from iqa_dist.pack import PackOptions, pack
from iqa_dist.data.stream import (EvalPatches, TrainPatches, eval_loader, grid_positions, load_split,
                                  steps_per_epoch, to_model_input, train_crops, train_loader)


def _epoch_counts(split, epoch, *, world, workers, patch_num, batch_size):
    """Patches per image key that the real loaders of all ranks yield in one epoch."""
    counts, batches = Counter(), []
    for rank in range(world):
        loader = train_loader(split, patch_num=patch_num, patch_size=32, batch_size=batch_size, seed=7,
                              rank=rank, world=world, workers=workers, shuffle_buffer=6)
        loader.dataset.set_epoch(epoch)
        mine = list(loader)
        batches.append(len(mine))
        assert all(len(keys) == batch_size for _, _, keys, _ in mine)
        counts.update(k for _, _, keys, _ in mine for k in keys)
    return counts, batches


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 1, 3])
def test_every_image_gives_patch_num_patches_every_epoch(small_shards, world, workers):
    """The remainder rule: fewer than one global batch of extra patches tops up the last
    batch, from images that change from epoch to epoch; nobody is short."""
    split = load_split(small_shards, "train")
    patch_num, batch_size = 3, 2
    steps = steps_per_epoch(len(split), patch_num, batch_size, world)
    extra = steps * batch_size * world - len(split) * patch_num
    assert 0 <= extra < batch_size * world
    topped_up = []
    for epoch in range(3):
        counts, batches = _epoch_counts(split, epoch, world=world, workers=workers,
                                        patch_num=patch_num, batch_size=batch_size)
        assert batches == [steps] * world  # every rank the same number of batches
        assert set(counts) == split.keys
        assert min(counts.values()) == patch_num
        assert sum(counts.values()) - patch_num * len(split) == extra
        topped_up.append({k for k, n in counts.items() if n > patch_num})
    if extra:
        assert len({frozenset(t) for t in topped_up}) > 1  # not the same images every epoch


def test_batches_mix_references_like_uniform_draws(tmp_path):
    """A KADID-like set packed in reader order (one reference after another): each batch
    still holds about as many references as a uniformly random batch would."""
    refs, per_ref, patch_num, batch_size = 8, 30, 4, 8
    root = make_tiny_set(tmp_path / "src", refs, per_ref)
    out = tmp_path / "shards"
    pack("csv", root, out, PackOptions(shard_size=60, rounds=1), workers=0)
    split = load_split(out, "all")
    ref_of = {r["key"]: r["ref"] for r in read_manifest(out)}
    loader = train_loader(split, patch_num=patch_num, patch_size=32, batch_size=batch_size, seed=0,
                          rank=0, world=1, workers=0, shuffle_buffer=40)
    ours = np.mean([len({ref_of[k] for k in keys}) for _, _, keys, _ in loader])
    rng = np.random.default_rng(0)
    patches = np.repeat(np.arange(refs), per_ref * patch_num)
    uniform = np.mean([len(set(rng.choice(patches, batch_size, replace=False))) for _ in range(2000)])
    assert abs(ours - uniform) <= 0.2 * uniform, (ours, uniform)


def make_tiny_set(root, refs, per_ref):
    """A csv layout of small images listed reference by reference, as synthetic sets come."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["name,mos,ref"]
    for r in range(refs):
        for d in range(per_ref):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"img/r{r}_{d}.png")
            lines.append(f"img/r{r}_{d}.png,{rng.uniform(0, 100):.3f},r{r}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_each_image_is_decoded_once_per_epoch(small_shards, monkeypatch):
    split = load_split(small_shards, "train")
    decoded = Counter()
    real = stream.open_rgb

    def counting(data, where):
        decoded[where] += 1
        return real(data, where)

    monkeypatch.setattr(stream, "open_rgb", counting)
    ds = TrainPatches(split, 6, 224, batch_size=4, seed=0, rank=0, world=1, shuffle_buffer=3)
    assert sum(len(keys) for _, _, keys, _ in ds) >= 6 * len(split)
    assert len(decoded) == len(split) and set(decoded.values()) == {1}


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


def test_loaders_yield_uint8_and_the_device_side_normalises(small_shards):
    split = load_split(small_shards, "train")
    x, _, _, _ = next(iter(TrainPatches(split, 8, 224, batch_size=16, seed=0, rank=0, world=1, shuffle_buffer=16)))
    assert x.dtype == torch.uint8 and x.shape == (16, 224, 224, 3)
    y = to_model_input(x, "cpu")
    assert y.dtype == torch.float32 and y.shape == (16, 3, 224, 224) and y.is_contiguous()
    assert -2.2 < y.min() < -1.5 and 2.0 < y.max() < 2.7  # ImageNet statistics
    reference = (x.permute(0, 3, 1, 2).double() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).double()) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1).double()
    assert (y.double() - reference).abs().max() < 1e-5
    last = to_model_input(x, "cpu", torch.bfloat16, channels_last=True)
    assert last.dtype == torch.bfloat16 and last.is_contiguous(memory_format=torch.channels_last)


def test_only_the_patches_travel_to_the_device_per_batch(monkeypatch):
    """The normalisation constants are moved to a device once: each ``.to`` is a blocking
    host-to-device copy on a GPU, so a batch may pay for its patches only."""
    real_to, moved = torch.Tensor.to, []

    def to(self, *args, **kwargs):
        moved.append(self.shape)
        return real_to(self, *args, **kwargs)

    x = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    to_model_input(x, "cpu")  # the first batch on a device may place the constants
    monkeypatch.setattr(torch.Tensor, "to", to)
    for _ in range(3):
        to_model_input(x, "cpu")
    assert moved == [x.shape] * 3


def test_loaders_pin_memory_as_the_caller_says(small_shards, monkeypatch):
    """Page-locked batches only help copies to a GPU: the caller's device decides, not
    whether the machine has one (a CPU run on a GPU machine would pin for nothing)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    split = load_split(small_shards, "train")
    common = dict(patch_num=1, patch_size=32, batch_size=4, rank=0, world=1, workers=0)
    assert not train_loader(split, seed=0, shuffle_buffer=4, **common).pin_memory
    assert not eval_loader(split, **common).pin_memory
    assert eval_loader(split, **common, pin_memory=True).pin_memory


def test_training_on_device_normalised_input_matches_float_input_to_rounding():
    """A training step on uint8 patches normalised on the device gives the loss and the
    gradients of the same step on the float patches the loaders used to send."""
    from iqa_dist.models import create_model

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 224, 224, 3), generator=g, dtype=torch.uint8)
    y = torch.rand(4, generator=g)
    float_input = ((x.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                   / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    torch.manual_seed(0)
    model = create_model("micro", dropout_rate=0.0, drop_path_rate=0.0)
    steps = []
    for batch in (to_model_input(x, "cpu"), float_input):
        model.zero_grad()
        loss = torch.nn.functional.l1_loss(model(batch), y)
        loss.backward()
        steps.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = steps
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name, grad in grads_a.items():
        assert (grad - grads_b[name]).abs().max() <= 1e-4 * grad.abs().max() + 1e-8, name


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


def _cover(h, w, p, corners):
    covered = np.zeros((h, w), bool)
    for y, x in corners:
        covered[y:y + p, x:x + p] = True
    return covered


@pytest.mark.parametrize("n", [1, 2, 4, 9, 20, 25])
def test_grid_crops_are_distinct_and_one_lies_over_the_centre(n):
    h, w, p = 384, 512, 224
    corners = grid_positions(h, w, p, n)
    assert len(set(corners)) == n
    assert _cover(h, w, p, corners)[h // 2, w // 2]


@pytest.mark.parametrize("n", [9, 20, 25])
def test_grid_covers_the_whole_image_when_it_can(n):
    corners = grid_positions(384, 512, 224, n)
    assert (0, 0) in corners and (384 - 224, 512 - 224) in corners
    assert _cover(384, 512, 224, corners).all()


def test_grid_of_twenty_is_four_rows_of_five_and_one_crop_is_centred():
    corners = grid_positions(384, 512, 224, 20)
    assert len({y for y, _ in corners}) == 4 and len({x for _, x in corners}) == 5
    assert grid_positions(384, 512, 224, 1) == [((384 - 224) // 2, (512 - 224) // 2)]


def test_split_rounds_differ_and_unknown_round_is_a_clear_error(small_shards):
    assert load_split(small_shards, "test", 0).keys != load_split(small_shards, "test", 1).keys
    with pytest.raises(ConfigError, match="no split round 5"):
        load_split(small_shards, "test", 5)


# ---------------------------------------------------------------- bad shards and bad samples


def broken_copy(shards: Path, dest: Path, how: str, key: str | None = None) -> tuple[Path, Path]:
    """A copy of a packed set with a shard damaged (``how``): the first, or the one holding
    ``key`` (whose image is the bad one); (copy, that shard)."""
    copy = dest / "broken"
    shutil.copytree(shards, copy)
    shard = copy / next(r["shard"] for r in read_manifest(copy) if key in (None, r["key"]))
    data = shard.read_bytes()
    if how == "missing":
        shard.unlink()
    elif how == "truncated":  # cut inside a member's data
        shard.write_bytes(data[:len(data) // 2 + 100])
    elif how == "cut between members":  # a shorter archive, as far as tar can tell
        with tarfile.open(shard) as tar:
            second_sample = tar.getmembers()[2].offset
        shard.write_bytes(data[:second_sample])
    elif how == "garbage":
        shard.write_bytes(b"\x00\x01not a tar" * 999)
    elif how in ("bad image", "thin image"):  # a valid tar whose first image does not decode, or is a strip
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            bad = key or members[0][0].name.split(".")[0]
            for member, content in members:
                if member.name == f"{bad}.png":
                    content = b"\x89PNG garbage" if how == "bad image" else encode_png(Image.new("RGB", (2, 60)))
                member.size = len(content)
                tar.addfile(member, io.BytesIO(content))
    return copy, shard


def one_line_shard_error(run, shard: Path) -> str:
    with pytest.raises(stream.ShardError) as err:
        run()
    message = str(err.value)
    assert message.startswith(str(shard)) and "\n" not in message and "Caught" not in message, message
    return message


@pytest.mark.parametrize("how, problem", [("missing", "missing"), ("truncated", "unreadable, truncated"),
                                          ("cut between members", "images are not in it"),
                                          ("garbage", "unreadable, truncated or corrupted")])
@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_shard_is_one_line_naming_it_in_training_and_evaluation(small_shards, tmp_path, how, problem,
                                                                         workers):
    copy, shard = broken_copy(small_shards, tmp_path, how)
    split = load_split(copy, "all")
    train = train_loader(split, patch_num=2, patch_size=32, batch_size=4, seed=0, rank=0, world=1,
                         workers=workers, shuffle_buffer=8)
    assert problem in one_line_shard_error(lambda: list(stream.batches(train)), shard)
    evaluation = eval_loader(split, patch_num=1, patch_size=32, batch_size=4, rank=0, world=1, workers=workers)
    assert problem in one_line_shard_error(lambda: list(stream.batches(evaluation)), shard)
    if how == "missing":
        assert "missing (listed in" in one_line_shard_error(split.check_shards, shard)


def test_training_skips_a_bad_sample_and_keeps_the_epoch_exact(small_shards, tmp_path):
    copy, shard = broken_copy(small_shards, tmp_path, "bad image")
    split = load_split(copy, "all")
    loader = train_loader(split, patch_num=2, patch_size=32, batch_size=4, seed=0, rank=0, world=1,
                          workers=1, shuffle_buffer=8)
    good = [b for b in train_loader(load_split(small_shards, "all"), patch_num=2, patch_size=32, batch_size=4,
                                    seed=0, rank=0, world=1, workers=1, shuffle_buffer=8)]
    got = list(stream.batches(loader))
    assert len(got) == len(good) and all(len(keys) == 4 for _, _, keys, _ in got)
    bad = [problem for *_, problems in got for problem in problems]
    assert len(bad) == 1 and bad[0].startswith(f"{shard}:") and "unreadable image" in bad[0]
    evaluation = eval_loader(split, patch_num=1, patch_size=32, batch_size=4, rank=0, world=1, workers=1)
    assert "unreadable image" in one_line_shard_error(lambda: list(stream.batches(evaluation)), shard)


def test_a_strip_too_thin_to_upsample_is_a_bad_sample_in_training_and_an_error_in_evaluation(small_shards,
                                                                                            tmp_path):
    copy, shard = broken_copy(small_shards, tmp_path, "thin image")
    split = load_split(copy, "all")
    loader = train_loader(split, patch_num=2, patch_size=32, batch_size=4, seed=0, rank=0, world=1,
                          workers=0, shuffle_buffer=8)
    bad = [problem for *_, problems in stream.batches(loader) for problem in problems]
    assert len(bad) == 1 and bad[0].startswith(f"{shard}:") and bad[0].endswith(
        ": 2x60 is too thin to upsample to a 32-pixel patch (its sides are over 20:1)"), bad
    evaluation = eval_loader(split, patch_num=1, patch_size=32, batch_size=4, rank=0, world=1, workers=0)
    assert "2x60 is too thin" in one_line_shard_error(lambda: list(stream.batches(evaluation)), shard)


def test_a_split_too_small_or_flat_to_rank_says_why(small_shards):
    val = load_split(small_shards, "val")
    assert val.unrankable() is None
    one = stream.Split(val.root, "val", dict(list(val.shard_of.items())[:1]), {})
    assert one.unrankable() == "the val split holds 1 image(s): too few to rank"
    flat = stream.Split(val.root, "val", val.shard_of, dict.fromkeys(val.shard_of, 50.0))
    assert flat.unrankable() == f"the val split's {len(val)} images all have the label 50: nothing to rank"


def test_mirrored_crops_are_the_mirrored_pixels():
    """Mirrored crops come from one mirrored copy of the image: the same pixels as
    mirroring each crop, for the same draws."""
    arr = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    crops = train_crops(arr, 40, 16, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    ys, xs, flips = rng.integers(0, 35, 40), rng.integers(0, 55, 40), rng.random(40) < 0.5
    assert 0 < flips.sum() < 40
    for crop, y, x, flip in zip(crops, ys, xs, flips):
        patch = arr[y:y + 16, x:x + 16]
        assert np.array_equal(crop, patch[:, ::-1] if flip else patch)


def test_kept_batches_are_never_overwritten_by_a_worker_reusing_its_buffers(small_shards):
    """Workers refill a shared buffer only once the main process has freed its tensor:
    batches kept (all of them, or a view of one) equal those copied out at once."""
    split = load_split(small_shards, "all")

    def loader():  # 2 workers x 9 batches each: more than the buffers a worker keeps
        return train_loader(split, patch_num=3, patch_size=32, batch_size=2, seed=0, rank=0, world=1,
                            workers=2, shuffle_buffer=4, steps=18)

    copied = [patches.clone() for patches, *_ in loader()]
    kept = [patches for patches, *_ in loader()]
    views = [patches[1:] for patches, *_ in loader()]
    assert len(copied) == 18 > 2 * handover.KEPT
    assert all(torch.equal(c, k) and torch.equal(c[1:], v) for c, k, v in zip(copied, kept, views))


def test_a_worker_buffer_is_reused_only_once_every_tensor_of_it_is_freed(monkeypatch):
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions of tensors)

    monkeypatch.setattr(handover, "_buffers", {})  # this process plays the worker: its own buffers
    first = handover.buffer((4, 8)).fill_(7)
    received = pickle.loads(ForkingPickler.dumps(handover.Handover(first)))  # as the main process gets it
    assert torch.equal(received, first) and type(received) is torch.Tensor
    del first
    view = received[2:]
    del received
    gc.collect()
    held = handover.buffer((4, 8))  # the first buffer is still held through the view: a second one
    del view
    gc.collect()
    reused = handover.buffer((4, 8))
    assert held.untyped_storage().data_ptr() != reused.untyped_storage().data_ptr()
    assert reused.untyped_storage().data_ptr() == handover._buffers[32][0].data_ptr()


def _buffers_held() -> int:
    return sum(len(kept) for kept in handover._buffers.values())


def test_a_forked_worker_starts_without_its_parents_buffers(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(handover, "_buffers", {})
    handover.buffer((2, 2))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_buffers_held) == 0
    assert _buffers_held() == 1

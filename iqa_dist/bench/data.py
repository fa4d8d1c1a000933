"""``bench data``: patches/s of our training stream against the original per-patch decoding."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from torch.utils.data import DataLoader

from ..config import ConfigError
from ..data.stream import Split, _collate, train_crops, train_loader
from ..images import open_rgb
from ..models.hyperiqa import PATCH
from .common import Result, target, timed_patches
from .sets import bench_images, reference_dataset, sample_split, stored_images


def decode_once_bound(split: Split, patch_num: int, parallel: int) -> dict[str, float]:
    """Patches/s if each image were decoded once and cut into ``patch_num`` crops, with no
    other cost: decode time / patch_num + crop-flip-collate time, over ``parallel`` cores."""
    decode, arrays = [], []
    for key, _, data in stored_images(split):
        start = time.perf_counter()
        arrays.append(np.asarray(open_rgb(data, key)[0]))
        decode.append(time.perf_counter() - start)
    rng = np.random.default_rng(0)
    crop = []
    for arr in arrays:  # the stream's own cropping and stacking
        start = time.perf_counter()
        _collate([(patch, 0.0, "") for patch in train_crops(arr, patch_num, PATCH, rng)])
        crop.append((time.perf_counter() - start) / patch_num)
    per_patch = float(np.mean(decode)) / patch_num + float(np.mean(crop))
    return {"decode_ms": 1000 * float(np.mean(decode)), "crop_ms": 1000 * float(np.mean(crop)),
            "patches_s": parallel / per_patch}


def bench_data(args: argparse.Namespace) -> Result:
    with bench_images(args) as shards:
        return _bench_data(args, *sample_split(shards, args.images))


def ours_rates(split: Split, args: argparse.Namespace, workers: Iterable[int]) -> list[tuple[int, float]]:
    """(patches, patches/s) of the training loader with each number of ``workers``: the
    median over ``--passes`` epochs, each timed from its first batch (worker start-up and
    buffer filling excluded). The loaders take turns, epoch by epoch, so that a change in
    the machine's load weighs on all of them alike."""
    loaders = [train_loader(split, patch_num=args.patch_num, patch_size=PATCH, batch_size=args.batch_size,
                            seed=0, rank=0, world=1, workers=w, shuffle_buffer=args.shuffle_buffer)
               for w in workers]
    runs: list[list[tuple[int, float]]] = [[] for _ in loaders]
    for epoch in range(args.passes):
        for loader, timed in zip(loaders, runs):
            loader.dataset.set_epoch(epoch)
            timed.append(timed_patches(loader))
    return [(timed[0][0], float(np.median([n / s for n, s in timed]))) for timed in runs]


def _bench_data(args: argparse.Namespace, split: Split, rows: list[dict]) -> Result:
    total = len(rows) * args.patch_num
    if total < 2 * args.batch_size:  # the first batch is not timed
        raise ConfigError(f"{len(rows)} images x {args.patch_num} patches: fewer than two batches")
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_dataset(split, rows, Path(tmp), args.patch_num, flip=True)
        ref_n, ref_s = timed_patches(DataLoader(ref, batch_size=args.batch_size, shuffle=True,
                                                num_workers=args.workers))
    serial, parallel = ours_rates(split, args, (0, args.workers))
    cores = max(1, min(args.workers, len(os.sched_getaffinity(0))))
    bound = decode_once_bound(split, args.patch_num, cores)
    ref_rate = ref_n / ref_s
    rows_out = [{"loader": f"reference (decode + resize per patch), {args.workers} workers", "patches": ref_n,
                 "patches/s": ref_rate},
                {"loader": "ours (decode once), in process", "patches": serial[0], "patches/s": serial[1]},
                {"loader": f"ours (decode once), {args.workers} workers", "patches": parallel[0],
                 "patches/s": parallel[1]},
                {"loader": f"decode-once bound ({cores} core(s))", "patches": "", "patches/s": bound["patches_s"]}]
    speedup, to_bound, scaling = parallel[1] / ref_rate, bound["patches_s"] / parallel[1], parallel[1] / serial[1]
    note = "" if args.patch_num == 20 else f" (measured at {args.patch_num})"
    targets = [target(f"ours / reference >= 20x at 20 patches/image{note}", speedup, speedup >= 20),
               target("bound / ours <= 1.3x", to_bound, to_bound <= 1.3)]
    if cores >= 2:
        targets.append(target(f"ours {args.workers} workers / in process >= 1.7x", scaling, scaling >= 1.7))
    return Result("data", rows_out, targets,
                  {"images": len(rows), "patch_num": args.patch_num, "workers": args.workers, "cores": cores,
                   "speedup": speedup, "bound_over_ours": to_bound, "workers_over_serial": scaling,
                   **{f"bound_{k}": v for k, v in bound.items()}})

"""Benchmarks of the claims the design rests on, each against its reference.

    python -m iqa_dist.bench data  [--shards DIR --patch_num 20 --workers 2 --images 64]
    python -m iqa_dist.bench step  [--model_size tiny --batch_size 32 --iters 5]
    python -m iqa_dist.bench ddp   [--model_size micro --batch_size 8 --iters 10]
    python -m iqa_dist.bench eval  [--checkpoint RUN --shards DIR --images 32]
    python -m iqa_dist.bench sweep

Each prints a table and whether its target was met (``--json PATH`` also writes it).
Without ``--shards``, ``data`` and ``eval`` build a KonIQ-10k-like set first: photographs
as JPEGs of KonIQ's 1024x768, packed at 512x384 as KonIQ is (``--resize koniq``).
Speeds depend on the machine and its load: these are measurements, not tests.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .config import Config, ConfigError
from .data.stream import IMAGE_EXTS, MEAN, STD, Split, _collate, train_loader
from .evaluate import predict_split
from .images import open_rgb
from .models.hyperiqa import PATCH
from .optim import build_optimizer, build_scheduler
from .pack import read_manifest
from .tools import default_device, load_trained, markdown_table, model_from_config, time_calls

REPO = Path(__file__).resolve().parents[1]
TWO_CPU_RANKS = REPO / "launch" / "cpu_2proc.yaml"


@dataclass
class Result:
    bench: str
    rows: list[dict]
    targets: list[str] = field(default_factory=list)  # "target ...: value: met | not met"
    figures: dict[str, Any] = field(default_factory=dict)


def target(text: str, value: float, met: bool) -> str:
    return f"target {text}: {value:.2f} ({'met' if met else 'NOT met'})"


# ---------------------------------------------------------------- images for the data and eval benches


KONIQ_SIZE = (1024, 768)  # KonIQ-10k's released images
COLOUR_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


def koniq_like(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` KonIQ-sized JPEGs (quality 90) cut from scikit-image's colour photographs,
    packed as KonIQ-10k is; returns the packed set. Decoding real 1024x768 JPEGs is what
    a loader spends its time on, which the demo's small PNG tiles do not show."""
    from .pack import PackOptions, pack
    from .sources.demo import _photo

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    photos = [_photo(name) for name in COLOUR_PHOTOS]
    with open(root / "labels.csv", "w") as f:
        f.write("name,mos\n")
        for i in range(n):
            img = photos[i % len(photos)]
            w, h = img.size
            cw = int(min(w, h * 4 / 3) * rng.uniform(0.6, 1.0))  # a 4:3 view of the photograph
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - cw * 3 // 4 + 1)
            view = img.crop((x, y, x + cw, y + cw * 3 // 4)).resize(KONIQ_SIZE, Image.Resampling.BICUBIC)
            view.save(root / "images" / f"{i:05d}.jpg", quality=90)
            f.write(f"images/{i:05d}.jpg,{rng.uniform(1, 100):.2f}\n")
    pack("csv", root, root / "shards", PackOptions(resize="koniq", rounds=1), workers=0)
    return root / "shards"


@contextlib.contextmanager
def bench_images(args: argparse.Namespace) -> Iterator[Path]:
    """The packed set to read: ``--shards``, or a KonIQ-like set built for this run."""
    if args.shards:
        yield args.shards
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building {args.images} KonIQ-sized JPEGs (--shards to use a packed set) ...",
              file=sys.stderr, flush=True)
        yield koniq_like(Path(tmp), args.images)


def sample_split(shards: Path, n: int) -> tuple[Split, list[dict]]:
    """The first ``n`` images of a packed set (manifest order: few shards), as a split."""
    rows = sorted(read_manifest(shards), key=lambda r: (r["shard"], r["key"]))[:n]
    if not rows:
        raise ConfigError(f"{shards}: no images")
    return Split.from_rows(Path(shards), "bench", rows), rows


def stored_images(split: Split) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of the split's images as the shards hold them."""
    for shard in split.shards:
        for sample in wds.tarfile_samples([{"url": str(shard)}]):
            if sample["__key__"] in split.keys:
                ext = next(e for e in IMAGE_EXTS if e in sample)
                yield sample["__key__"], ext, sample[ext]


def reference_files(split: Split, rows: list[dict], tmp: Path) -> list[Path]:
    """The files the original loader would open: the source image when it is still there
    (it is then resized to the stored size), else the stored bytes written out."""
    stored = {}
    for key, ext, data in stored_images(split):
        stored[key] = tmp / f"{len(stored):06d}.{ext}"
        stored[key].write_bytes(data)
    return [Path(r["path"]) if Path(r["path"]).is_file() else stored[r["key"]] for r in rows]


class ReferencePatches(Dataset):
    """The original HyperIQA loader: each item is one patch, and each patch opens, decodes
    and resizes its whole image file again (PIL open, convert RGB, Resize, RandomCrop,
    [RandomHorizontalFlip], ToTensor, Normalize)."""

    def __init__(self, files: list[Path], sizes: list[tuple[int, int]], labels: list[float],
                 patch_num: int, flip: bool) -> None:
        self.items = [item for item in zip(files, sizes, labels) for _ in range(patch_num)]
        steps = [transforms.RandomCrop(PATCH, pad_if_needed=True)]
        steps += [transforms.RandomHorizontalFlip()] if flip else []
        self.transform = transforms.Compose(steps + [transforms.ToTensor(),
                                                     transforms.Normalize(MEAN / 255, STD / 255)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        path, size, label = self.items[i]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        if img.size != size:  # the original resized on every read (KonIQ to 512x384)
            img = img.resize(size, Image.Resampling.BILINEAR)
        return self.transform(img), label


def reference_dataset(split: Split, rows: list[dict], tmp: Path, patch_num: int, flip: bool) -> ReferencePatches:
    files = reference_files(split, rows, tmp)
    return ReferencePatches(files, [(r["width"], r["height"]) for r in rows], [r["label"] for r in rows],
                            patch_num, flip)


def timed_patches(batches: Iterable) -> tuple[int, float]:
    """(patches, seconds) of the steady state: the clock starts at the first batch, so
    neither worker start-up nor filling a shuffle buffer counts (the first item of a
    batch is its patches)."""
    batches = iter(batches)
    next(batches)
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch[0])
    return n, time.perf_counter() - start


# ---------------------------------------------------------------- data


def decode_once_bound(split: Split, patch_num: int, batch_size: int, parallel: int) -> dict[str, float]:
    """Patches/s if each image were decoded once and cut into ``patch_num`` crops, with no
    other cost: decode time / patch_num + crop-flip-collate time, over ``parallel`` cores."""
    decode, arrays = [], []
    for key, _, data in stored_images(split):
        start = time.perf_counter()
        arrays.append(np.asarray(open_rgb(data, key)[0]))
        decode.append(time.perf_counter() - start)
    rng = np.random.default_rng(0)
    crop = []
    for arr in arrays:
        start = time.perf_counter()
        h, w = arr.shape[:2]
        items = []
        for _ in range(batch_size):
            y, x = rng.integers(0, max(1, h - PATCH + 1)), rng.integers(0, max(1, w - PATCH + 1))
            patch = arr[y:y + PATCH, x:x + PATCH]
            items.append((patch[:, ::-1] if rng.random() < 0.5 else patch, 0.0, ""))
        _collate(items)  # the stream's own stacking
        crop.append((time.perf_counter() - start) / batch_size)
    per_patch = float(np.mean(decode)) / patch_num + float(np.mean(crop))
    return {"decode_ms": 1000 * float(np.mean(decode)), "crop_ms": 1000 * float(np.mean(crop)),
            "patches_s": parallel / per_patch}


def bench_data(args: argparse.Namespace) -> Result:
    with bench_images(args) as shards:
        return _bench_data(args, *sample_split(shards, args.images))


def ours_rate(split: Split, args: argparse.Namespace, workers: int) -> tuple[int, float]:
    """(patches, patches/s) of the training loader: the median over ``--passes`` epochs,
    each timed from its first batch (worker start-up and buffer filling excluded)."""
    loader = train_loader(split, patch_num=args.patch_num, patch_size=PATCH, batch_size=args.batch_size,
                          seed=0, rank=0, world=1, workers=workers, shuffle_buffer=args.shuffle_buffer)
    runs = []
    for epoch in range(args.passes):
        loader.dataset.set_epoch(epoch)
        runs.append(timed_patches(loader))
    return runs[0][0], float(np.median([n / s for n, s in runs]))


def _bench_data(args: argparse.Namespace, split: Split, rows: list[dict]) -> Result:
    total = len(rows) * args.patch_num
    if total < 2 * args.batch_size:  # the first batch is not timed
        raise ConfigError(f"{len(rows)} images x {args.patch_num} patches: fewer than two batches")
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_dataset(split, rows, Path(tmp), args.patch_num, flip=True)
        ref_n, ref_s = timed_patches(DataLoader(ref, batch_size=args.batch_size, shuffle=True,
                                                num_workers=args.workers))
    serial, parallel = ours_rate(split, args, 0), ours_rate(split, args, args.workers)
    cores = max(1, min(args.workers, len(os.sched_getaffinity(0))))
    bound = decode_once_bound(split, args.patch_num, args.batch_size, cores)
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


# ---------------------------------------------------------------- training steps


class BackboneOnly(nn.Module):
    """The backbone with the cheapest possible head: what a HyperIQA step is compared with."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone  # the name puts it in the optimiser's backbone group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([f.mean(dim=(1, 2, 3)) for f in self.backbone(x)]).sum(0)


def train_step_fn(model: nn.Module, cfg: Config, accelerator: Any, images: torch.Tensor,
                  labels: torch.Tensor) -> Callable[[], float]:
    """One optimiser step of the real training loop (``Trainer.train_step``) on a fixed batch."""
    from .train import Trainer

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 1_000_000)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainer = SimpleNamespace(accelerator=accelerator, cfg=cfg, model=model, optimizer=optimizer,
                              scheduler=scheduler, forward=model, channels_last=False)
    return lambda: Trainer.train_step(trainer, images, labels)


def use_device(device: str) -> None:
    """``make_accelerator`` takes the GPU when there is one unless told otherwise."""
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    else:
        os.environ.pop("ACCELERATE_USE_CPU", None)


def synthetic_batch(batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC patches, as the loaders yield them, and labels."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.randint(0, 256, (batch_size, PATCH, PATCH, 3), generator=g, dtype=torch.uint8)
    return patches, torch.rand(batch_size, generator=g) * 100


def bench_step(args: argparse.Namespace) -> Result:
    from .train import make_accelerator

    use_device(args.device)
    cfg = Config(model_size=args.model_size, batch_size=args.batch_size)
    accelerator = make_accelerator(cfg)
    images, labels = synthetic_batch(args.batch_size)
    steps = {"HyperIQA": train_step_fn(model_from_config(cfg), cfg, accelerator, images, labels),
             "backbone only": train_step_fn(BackboneOnly(model_from_config(cfg).backbone), cfg,
                                            accelerator, images, labels)}
    for step in steps.values():  # warm both before timing either
        time_calls(step, 0, args.warmup, accelerator.device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.iters):  # alternate, so that a busy neighbour slows both alike
        for name, step in steps.items():
            times[name] += time_calls(step, 1, 0, accelerator.device).tolist()
    ms = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    rows = [{"step": name, "median ms": ms[name], "mean ms": 1000 * float(np.mean(times[name])),
             "patches/s": args.batch_size / ms[name] * 1000} for name in steps]
    ratio = ms["HyperIQA"] / ms["backbone only"]
    return Result("step", rows, [target("HyperIQA / backbone-only step <= 1.15x", ratio, ratio <= 1.15)],
                  {"model_size": args.model_size, "batch_size": args.batch_size,
                   "device": str(accelerator.device), "ratio": ratio})


# ---------------------------------------------------------------- DDP scaling


def ddp_worker(args: argparse.Namespace) -> Result:
    """One rank of the DDP bench (started by ``bench ddp``): timed steps on synthetic data."""
    from .train import make_accelerator

    torch.set_num_threads(1)
    use_device("cpu")
    cfg = Config(model_size=args.model_size, batch_size=args.batch_size)
    accelerator = make_accelerator(cfg)
    images, labels = synthetic_batch(args.batch_size, seed=accelerator.process_index)
    step = train_step_fn(model_from_config(cfg), cfg, accelerator, images, labels)
    for _ in range(args.warmup):
        step()
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    world = accelerator.num_processes
    if accelerator.is_main_process and args.json:
        Path(args.json).write_text(json.dumps({"world": world, "seconds": seconds,
                                               "samples_s": world * args.batch_size * args.iters / seconds}))
    accelerator.end_training()
    return Result("ddp-worker", [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(world: int, args: argparse.Namespace, out: Path) -> dict:
    worker = ["-m", "iqa_dist.bench", "ddp-worker", "--model_size", args.model_size, "--batch_size",
              str(args.batch_size), "--iters", str(args.iters), "--warmup", str(args.warmup), "--json", str(out)]
    if world == 1:
        cmd = [sys.executable, *worker]
    else:
        if not TWO_CPU_RANKS.exists():
            raise ConfigError(f"{TWO_CPU_RANKS}: missing (run from a source checkout)")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_CPU_RANKS),
               "--num_processes", str(world), "--main_process_port", str(_free_port()), *worker]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0 or not out.exists():
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{world}-rank run failed (exit {done.returncode}): {tail[0]}")
    return json.loads(out.read_text())


def bench_ddp(args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        runs = [_run_ranks(world, args, Path(tmp) / f"{world}.json") for world in (1, 2)]
    rows = [{"ranks": r["world"], "samples/s": r["samples_s"], "seconds": r["seconds"]} for r in runs]
    scaling = runs[1]["samples_s"] / runs[0]["samples_s"]
    return Result("ddp", rows, [target("2 ranks / 1 rank samples/s >= 1.7x", scaling, scaling >= 1.7)],
                  {"model_size": args.model_size, "batch_size_per_rank": args.batch_size,
                   "threads_per_rank": 1, "scaling": scaling})


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def reference_eval(model: nn.Module, dataset: ReferencePatches, device: torch.device, workers: int) -> int:
    """The original test loop: batch 1, one forward and one host sync per patch; patches scored."""
    n = 0
    for image, _ in DataLoader(dataset, batch_size=1, num_workers=workers):
        float(model(image.to(device)).item())
        n += 1
    return n


def eval_model(args: argparse.Namespace) -> tuple[nn.Module, Config]:
    if args.checkpoint:
        trained = load_trained(args.checkpoint)
        return trained.model, trained.cfg
    cfg = Config(model_size=args.model_size)
    return model_from_config(cfg).eval(), cfg


def bench_eval(args: argparse.Namespace) -> Result:
    from .train import make_accelerator

    use_device(args.device)
    model, cfg = eval_model(args)
    cfg = replace(cfg, test_patch_num=args.patch_num, workers=args.workers, test_random_crop=False,
                  mixed_precision="no")
    accelerator = make_accelerator(cfg)
    model = model.to(accelerator.device).eval()
    with bench_images(args) as shards:
        return _bench_eval(args, model, cfg, accelerator, *sample_split(shards, args.images))


def _bench_eval(args: argparse.Namespace, model: nn.Module, cfg: Config, accelerator: Any, split: Split,
                rows: list[dict]) -> Result:
    start = time.perf_counter()
    scored = predict_split(model, split, cfg, accelerator, args.batch_size)
    ours_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        dataset = reference_dataset(split, rows, Path(tmp), args.patch_num, flip=False)
        start = time.perf_counter()
        reference_eval(model, dataset, accelerator.device, args.workers)
        ref_s = time.perf_counter() - start
    n = len(rows)
    table = [{"evaluation": "reference (batch 1, .item() per patch)", "images": n, "seconds": ref_s,
              "images/s": n / ref_s},
             {"evaluation": f"ours (predict_split, batch {args.batch_size})", "images": len(scored),
              "seconds": ours_s, "images/s": len(scored) / ours_s}]
    speedup = ref_s / ours_s
    return Result("eval", table, [target("ours / reference images/s >= 10x", speedup, speedup >= 10)],
                  {"model_size": cfg.model_size, "patch_num": args.patch_num, "workers": args.workers,
                   "device": str(accelerator.device), "speedup": speedup})


# ---------------------------------------------------------------- sweep


def sweep_spec(args: argparse.Namespace, scheduler: dict[str, Any], name: str, storage: Path) -> dict:
    """The same grid of trials for both runs; only the scheduler differs."""
    overrides = {"dataset": str(args.shards), "epochs": args.epochs, "early_stopping": False,
                 "spaq": False, "plots": False, "max_steps_per_epoch": args.max_steps_per_epoch}
    return {"base": str(args.base), "overrides": overrides, "search": "grid", "num_samples": 1,
            "space": {"lr": {"type": "grid", "values": args.lr},
                      "ranking_loss_alpha": {"type": "grid", "values": args.alpha}},
            "scheduler": scheduler, "max_concurrent": args.max_concurrent,
            "resources_per_trial": {"cpu": 1}, "storage_path": str(storage), "name": name}


def bench_sweep(args: argparse.Namespace) -> Result:
    from .tune import ray_cluster, run_sweep

    schedulers = {"grid (every trial to the end)": {"type": "none"},
                  "ASHA": {"type": "asha", "grace_period": args.grace_period,
                           "reduction_factor": args.reduction_factor}}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp, ray_cluster(None, args.max_concurrent):
        storage = args.storage_path or Path(tmp)
        for i, (name, scheduler) in enumerate(schedulers.items()):
            tables[name] = run_sweep(sweep_spec(args, scheduler, f"bench-{i}-{scheduler['type']}", storage))
    rows = [{"search": name, "trials": len(t), "epochs trained": int(t["compute_epochs"].sum()),
             "training s": float(t["compute_s"].sum()), "best val SRCC": float(t["best_val_srcc"].max())}
            for name, t in tables.items()]
    grid, asha = rows
    compute = asha["epochs trained"] / grid["epochs trained"]
    gap = grid["best val SRCC"] - asha["best val SRCC"]
    return Result("sweep", rows, [target("grid best - ASHA best val SRCC <= 0.01", gap, gap <= 0.01),
                                  target("ASHA / grid epochs trained <= 0.40", compute, compute <= 0.4)],
                  {"compute_ratio": compute, "srcc_gap": gap, "epochs": args.epochs})


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", help="also write the results here")
    sub = p.add_subparsers(dest="bench", required=True)

    data = sub.add_parser("data", parents=[common], help="patches/s: our stream vs per-patch decoding")
    _images_args(data, images=64)
    data.add_argument("--batch_size", type=int, default=32)
    data.add_argument("--shuffle_buffer", type=int, default=256, help="our stream's (default 256)")
    data.add_argument("--passes", type=int, default=3, help="epochs of our loader, median taken (default 3)")

    step = sub.add_parser("step", parents=[common], help="HyperIQA training step vs backbone only")
    _model_args(step, size="tiny", batch_size=32, iters=5)
    step.add_argument("--device", default="cpu")

    for name, helptext in (("ddp", "samples/s of 2 CPU ranks vs 1, one thread each"),
                           ("ddp-worker", "internal: one rank of the ddp bench")):
        ddp = sub.add_parser(name, parents=[common], help=helptext)
        _model_args(ddp, size="micro", batch_size=8, iters=10)

    ev = sub.add_parser("eval", parents=[common], help="images/s: batched evaluation vs batch-1 reference")
    _images_args(ev, images=32)
    ev.add_argument("--checkpoint", help="a trained run (default: an untrained --model_size model)")
    ev.add_argument("--model_size", default="micro")
    ev.add_argument("--batch_size", type=int, default=32)
    ev.add_argument("--device", default=default_device())

    sweep = sub.add_parser("sweep", parents=[common], help="ASHA vs grid on the demo set")
    sweep.add_argument("--base", type=Path, default=REPO / "configs" / "demo.yaml", help="train config")
    sweep.add_argument("--shards", type=Path, default=Path("shards/demo"))
    sweep.add_argument("--epochs", type=int, default=8)
    sweep.add_argument("--max_steps_per_epoch", type=int, default=0, help="0: full epochs")
    sweep.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    sweep.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.5], help="ranking_loss_alpha grid")
    sweep.add_argument("--grace_period", type=int, default=1)
    sweep.add_argument("--reduction_factor", type=int, default=2)
    sweep.add_argument("--max_concurrent", type=int, default=2)
    sweep.add_argument("--storage_path", type=Path, help="keep the sweeps here (default: a temporary folder)")
    return p.parse_args(argv)


def _images_args(p: argparse.ArgumentParser, images: int) -> None:
    p.add_argument("--shards", type=Path, help="a packed set (default: build KonIQ-sized JPEGs)")
    p.add_argument("--images", type=int, default=images, help=f"images to use (default {images})")
    p.add_argument("--patch_num", type=int, default=20, help="patches per image (default 20)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")


def _model_args(p: argparse.ArgumentParser, size: str, batch_size: int, iters: int) -> None:
    p.add_argument("--model_size", default=size, help=f"(default {size})")
    p.add_argument("--batch_size", type=int, default=batch_size, help=f"(default {batch_size})")
    p.add_argument("--iters", type=int, default=iters, help=f"timed steps (default {iters})")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")


BENCHES: dict[str, Callable[[argparse.Namespace], Result]] = {
    "data": bench_data, "step": bench_step, "ddp": bench_ddp, "ddp-worker": ddp_worker,
    "eval": bench_eval, "sweep": bench_sweep}


def show(result: Result) -> None:
    print(f"## bench {result.bench}")
    print(markdown_table(result.rows))
    for line in result.targets:
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = BENCHES[args.bench](args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.bench == "ddp-worker":
        return 0
    show(result)
    if args.json:
        Path(args.json).write_text(json.dumps(vars(result), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pack a native IQA data set into WebDataset shards with a Parquet manifest.

    python -m iqa_dist.pack --dataset koniq-10k --root /data/koniq --out shards/koniq-10k
    python -m iqa_dist.pack --dataset demo --out shards/demo

Output: ``NAME-00000.tar`` ... (one sample per image: the image bytes under their
format's extension, plus ``json`` with label and ids), ``manifest.parquet`` (one row per
image, with ``split_<r>`` columns for each seeded split round), ``_info.json`` (counts
and shard lengths per split), ``card.json``/``card.md`` and ``pack_report.json``.

Shards hold every image once, in a seeded random order (so that a stretch of a shard is
a fair sample of the set, not one reference's distortions); splits live in the manifest,
so N split rounds cost no extra storage. Each shard is written under a temporary name and renamed when complete,
with its rows beside it: a re-run skips finished shards and continues. ``pack_inputs.json``
records what the shards are made from (labels, images, options) when packing starts: a
re-run with other inputs is refused (or rebuilt with ``--overwrite``), and a merge of
``--slice`` jobs knows which shards and how many images to expect.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import atomic
from .runlock import LockedError, RunLock
from .data.manifest import SPLITS, file_sha1, read_manifest, write_manifest
from .images import DECODING, BadImage, check_resize, encode_jpeg, encode_png, open_rgb, resize_policy
from .sources import DatasetInfo, LayoutError, Record, Skipped, get_reader

INPUTS = "pack_inputs.json"
# The options that shape the shards; rounds and split only shape the manifest, rebuilt every run.
SHARD_OPTIONS = ("resize", "lossy_quality", "shard_size", "seed", "shuffle")
# Extensions by the format PIL finds in the bytes (MPO: phones' multi-picture JPEGs); the
# stream knows these, and "img" for anything else.
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif",
              "WEBP": "webp", "GIF": "gif"}


class PackError(ValueError):
    """The output folder does not fit this command: other inputs, missing slices."""


@dataclasses.dataclass
class PackOptions:
    resize: str = "none"  # none | seed | koniq | short:N (see resize_policy)
    lossy_quality: int = 0  # >0: store resized/converted images as JPEG of this quality
    shard_size: int = 500  # images per shard
    seed: int = 0
    shuffle: bool = True  # images in a seeded random order, so shards are not runs of one reference
    rounds: int = 10  # seeded split rounds (the original protocol reports 10)
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)


# ---------------------------------------------------------------- pixels


def stored_image(path: Path, options: PackOptions) -> tuple[bytes, str, Image.Image, str | None]:
    """Bytes to store, their extension, the decoded image, and a note on any conversion.

    Labels describe the original pixels: original bytes are kept whenever possible.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImage(f"{path}: missing (named in the label file)") from None
    except OSError as err:
        raise BadImage(f"{path}: cannot read ({err.strerror})") from None
    img, converted = open_rgb(data, str(path))
    resized = resize_policy(img, options.resize)
    if resized is None and converted is None:  # the bytes' own format, whatever the file's name
        return data, EXTENSIONS.get(img.format, "img"), img, None
    out = resized or img
    note = f"converted from {converted}" if converted else None
    if options.lossy_quality:
        return encode_jpeg(out, options.lossy_quality), "jpg", out, note
    return encode_png(out), "png", out, note


# ---------------------------------------------------------------- shards


def shard_name(dataset: str, index: int) -> str:
    return f"{dataset}-{index:05d}.tar"


def _write_shard(job: tuple[Path, str, list[Record], PackOptions]) -> tuple[str, list[dict], list[Skipped]]:
    """Write one shard atomically; return its manifest rows and what was skipped."""
    tar_path, dataset, records, options = job
    rows_path = tar_path.with_suffix(".rows.json")
    if tar_path.exists() and rows_path.exists():  # finished by an earlier run
        done = json.loads(rows_path.read_text())
        return tar_path.name, _stamped(done["rows"], tar_path), [Skipped(**s) for s in done["skipped"]]
    import webdataset as wds  # here, not at the top: a GPU image without it still imports pack

    rows, skipped = [], []
    with atomic.temporary(tar_path) as tmp:
        with wds.TarWriter(str(tmp), mtime=0) as sink:  # fixed mtime: reproducible shards
            for rec in records:
                try:
                    data, ext, img, note = stored_image(rec.path, options)
                except BadImage as err:
                    skipped.append(Skipped(where=str(rec.path), reason=str(err).split(": ", 1)[-1]))
                    continue
                meta = {"label": rec.label, "std": rec.std, "ref": rec.ref, "key": rec.key}
                sink.write({"__key__": rec.key, ext: data, "json": meta})
                rows.append(_row(rec, tar_path.name, ext, img, data, note))
        atomic.replace(tmp, tar_path)
    rows = _stamped(rows, tar_path)
    atomic.write_text(rows_path, json.dumps(
        {"rows": rows, "skipped": [dataclasses.asdict(s) for s in skipped]}))
    return tar_path.name, rows, skipped


def _stamped(rows: list[dict], tar_path: Path) -> list[dict]:
    """``rows`` with their shard's sha1, which a copy staged from a URL is checked against;
    rows of a shard finished by an older pack get it here, so running the same pack again
    adds it without packing any image again."""
    if rows and "shard_sha1" not in rows[0]:
        sha1 = file_sha1(tar_path)
        rows = [{**row, "shard_sha1": sha1} for row in rows]
    return rows


def _row(rec: Record, shard: str, ext: str, img: Image.Image, data: bytes, note: str | None) -> dict:
    return {
        "key": rec.key, "path": str(rec.path), "label": float(rec.label), "std": rec.std,
        "ref": rec.ref if rec.ref is not None else rec.key, "distortion": rec.distortion,
        "level": rec.level, "official_split": rec.split, "width": img.width, "height": img.height,
        "format": ext, "sha1": hashlib.sha1(data).hexdigest(), "shard": shard, "note": note,
    }


def _remove_temporaries(out: Path) -> None:
    """Temporaries of killed runs; call only where no other run writes (not in slices)."""
    for tmp in out.glob(f".*{atomic.SUFFIX}"):
        tmp.unlink(missing_ok=True)


def write_shards(records: list[Record], out: Path, dataset: str, options: PackOptions,
                 workers: int, part: tuple[int, int] = (0, 1)) -> tuple[list[dict], list[Skipped]]:
    """Pack ``records`` into shards of ``options.shard_size``; ``part=(i, n)`` writes every n-th."""
    chunks = [records[i:i + options.shard_size] for i in range(0, len(records), options.shard_size)]
    jobs = [(out / shard_name(dataset, j), dataset, chunk, options)
            for j, chunk in enumerate(chunks) if j % part[1] == part[0]]
    rows, skipped = [], []
    bar = tqdm(total=sum(len(j[2]) for j in jobs), unit="img", desc=f"pack {dataset}",
               disable=None)
    pool = (ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent,
                                initargs=(os.getpid(),)) if workers > 0 else _Inline())
    with pool:
        for _, shard_rows, shard_skipped in pool.map(_write_shard, jobs):
            rows += shard_rows
            skipped += shard_skipped
            bar.update(len(shard_rows) + len(shard_skipped))
    bar.close()
    return rows, skipped


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Pool initializer: without it a worker outlives a killed pack, blocked forever on its pipe.
    Ctrl-C reaches every process of the terminal's group: the parent alone stops the pack,
    so the workers' tracebacks do not bury its one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class _Inline:
    """Stands in for a process pool when ``--workers 0`` (debugging, profiling)."""

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    map = staticmethod(map)


# ---------------------------------------------------------------- splits


def assign_splits(units: list[str], fractions: tuple[float, float, float], seed: int,
                  round_: int) -> dict[str, str]:
    """Seeded split of the unique split units (images or reference ids)."""
    order = sorted(set(units))
    rng = np.random.default_rng([seed, round_])
    order = [order[i] for i in rng.permutation(len(order))]
    n = len(order)
    n_test = max(1, round(n * fractions[2])) if n >= 3 and fractions[2] > 0 else 0
    n_val = max(1, round(n * fractions[1])) if n >= 3 and fractions[1] > 0 else 0
    names = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    return dict(zip(order, names))


def split_columns(rows: list[dict], info: DatasetInfo, options: PackOptions) -> dict[str, list[str]]:
    """``split_<r>`` for each round. A set with an official split has that one split in every
    round: its published numbers are all on it, so rounds (train's --rounds) vary the seed only,
    as the seed's three Swin-B rounds on KonIQ did."""
    if rows and all(row["official_split"] for row in rows):
        return {f"split_{r}": [row["official_split"] for row in rows] for r in range(options.rounds)}
    unit = "ref" if info.split_unit == "reference" else "key"
    units = [r[unit] for r in rows]
    columns = {}
    for r in range(options.rounds):
        mapping = assign_splits(units, options.split, options.seed, r)
        columns[f"split_{r}"] = [mapping[u] for u in units]
    return columns


# ---------------------------------------------------------------- manifest, info, card


def info_json(rows: list[dict], info: DatasetInfo, rounds: int) -> dict:
    """Counts per split and shard, in the layout of timm's WebDataset ``_info.json``."""
    shards = sorted({r["shard"] for r in rows})
    splits = {}
    for name in SPLITS:
        lengths = [sum(1 for r in rows if r["shard"] == s and r["split_0"] == name) for s in shards]
        splits[name] = {"name": name, "num_samples": sum(lengths), "filenames": shards,
                        "shard_lengths": lengths}
    return {"name": info.name, "num_samples": len(rows), "rounds": rounds, "splits": splits}


def card(rows: list[dict], info: DatasetInfo, options: PackOptions, root: Path,
         skipped: int) -> dict:
    labels = np.array([r["label"] for r in rows], dtype=float)
    return {
        "name": info.name, "source": info.source or str(root), "root": str(root),
        "label_name": info.label_name, "scale": list(info.scale),
        "higher_is_better": info.higher_is_better, "split_unit": info.split_unit,
        "num_images": len(rows), "num_references": len({r["ref"] for r in rows}),
        "num_skipped": skipped,
        "label_stats": {"min": float(labels.min()), "max": float(labels.max()),
                        "mean": float(labels.mean()), "std": float(labels.std())} if len(rows) else {},
        "split_counts": {s: sum(r["split_0"] == s for r in rows) for s in SPLITS},
        "decoding": DECODING,
        "options": {k: list(v) if isinstance(v, tuple) else v
                    for k, v in dataclasses.asdict(options).items()},
    }


def card_markdown(c: dict) -> str:
    direction = "higher is better" if c["higher_is_better"] else "lower is better"
    resize = c["options"]["resize"]
    lines = [f"# {c['name']}", "", f"- source: {c['source']}",
             f"- label: {c['label_name']} on {c['scale'][0]}-{c['scale'][1]}, {direction}",
             f"- images: {c['num_images']} from {c['num_references']} split units "
             f"(split by {c['split_unit']}); skipped: {c['num_skipped']}",
             "- split round 0: " + ", ".join(f"{k} {v}" for k, v in c["split_counts"].items()),
             f"- resize: {resize}{' (original pixels)' if resize == 'none' else ''}",
             f"- decoding: {c.get('decoding', 'not recorded')}",
             f"- packing options: `{json.dumps(c['options'])}`", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- verify


def verify(out: Path) -> list[str]:
    """Check every shard against the manifest; return the problems found."""
    rows = read_manifest(out)
    expected = {(r["shard"], r["key"]): r for r in rows}
    problems, seen = [], set()
    sums = {r["shard"]: r.get("shard_sha1") for r in rows}
    for shard in sorted(sums):
        if sums[shard] and (out / shard).is_file() and file_sha1(out / shard) != sums[shard]:
            problems.append(f"{shard}: does not match its shard_sha1")
        try:
            with tarfile.open(out / shard) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    row = expected.get((shard, key))
                    if row is None:
                        problems.append(f"{shard}: {member.name} is not in the manifest")
                    elif ext == row["format"]:
                        data = tar.extractfile(member).read()
                        if hashlib.sha1(data).hexdigest() != row["sha1"]:
                            problems.append(f"{shard}: {member.name} does not match its sha1")
                        seen.add((shard, key))
        except (tarfile.TarError, OSError) as err:
            problems.append(f"{shard}: unreadable ({err})")
    problems += [f"{s}: {k} is in the manifest but not in the shard" for s, k in expected.keys() - seen]
    return problems


# ---------------------------------------------------------------- inputs record


def inputs_record(dataset: str, root: Path, records: list[Record], skipped: list[Skipped],
                  options: PackOptions) -> dict:
    """What the shards are made from, and how many there will be: finished shards may be
    reused only by a run with the same record, and a merge checks the slices against it."""
    labels = [{k: v for k, v in dataclasses.asdict(r).items() if k != "path"} for r in records]
    # sizes catch an image replaced under the same name without reading every image
    images = [(str(r.path), _file_size(r.path)) for r in records]
    return {"dataset": dataset, "root": str(root),
            "labels": _digest([labels, [dataclasses.asdict(s) for s in skipped]]),
            "images": _digest(images), "options": _shard_options(options),
            "num_images": len(records), "num_shards": math.ceil(len(records) / options.shard_size),
            "label_skipped": [dataclasses.asdict(s) for s in skipped]}


def _shard_options(options: PackOptions) -> dict:
    return {k: getattr(options, k) for k in SHARD_OPTIONS}


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # missing: reported when its shard is written
        return None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between two records, in words; ``new`` may hold only some parts."""
    out = [f"data set {old.get('dataset')} -> {new['dataset']}"] if old.get("dataset") != new["dataset"] else []
    out += [f"{part} changed" for part in ("labels", "images") if part in new and old.get(part) != new[part]]
    before = old.get("options", {})
    changed = [f"{k} {before.get(k)} -> {v}" for k, v in new["options"].items() if before.get(k) != v]
    return out + (["options: " + ", ".join(changed)] if changed else [])


def recorded_inputs(out: Path) -> dict:
    path = out / INPUTS
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PackError(f"{path}: not found; nothing was packed into {out} yet") from None
    except (OSError, ValueError) as err:
        raise PackError(f"{path}: unreadable ({err}); use --overwrite to rebuild") from None


def _claim(out: Path, inputs: dict) -> None:
    """Record this pack's inputs in ``out``, or check them against those of an earlier run
    (or of a concurrent slice): the first writer wins, every later one must match."""
    path = out / INPUTS
    # the record is written before any shard: shards without one come from an older version
    if not path.exists() and any(out.glob("*.rows.json")):
        raise PackError(f"{out}: holds shards of an earlier pack that did not record its inputs; "
                        "use --overwrite to rebuild")
    if atomic.write_text(path, json.dumps(inputs, indent=1), exclusive=True):
        return
    differences = _differences(recorded_inputs(out), inputs)
    if differences:
        raise PackError(f"{out}: packed from different inputs ({'; '.join(differences)}); "
                        "use --overwrite to rebuild")


def _remove_outputs(out: Path) -> None:
    """Everything an earlier pack wrote into ``out`` (``--overwrite``); a demo's source stays."""
    for pattern in ("*-[0-9][0-9][0-9][0-9][0-9].tar", "*-[0-9][0-9][0-9][0-9][0-9].rows.json",
                    "manifest.parquet", "_info.json", "card.json", "card.md", "pack_report*.json",
                    INPUTS, f".*{atomic.SUFFIX}"):
        for path in out.glob(pattern):
            path.unlink()


# ---------------------------------------------------------------- command line


def pack(dataset: str, root: Path | None, out: Path, options: PackOptions, workers: int = 2,
         part: tuple[int, int] | None = None, overwrite: bool = False, **reader_options: Any) -> dict:
    """Pack a data set; returns the report. ``part`` writes one slice of the shards only;
    ``overwrite`` rebuilds from scratch instead of continuing an earlier pack;
    ``reader_options`` go to the reader (``image_root`` for csv)."""
    sliced = part is not None and part[1] > 1
    if overwrite and sliced:
        raise PackError("--overwrite with --slice would remove the other slices' shards; "
                        f"remove {out} before starting the array job again")
    out.mkdir(parents=True, exist_ok=True)
    with _owned(out, sliced):
        if not sliced:  # the only run writing here: clear what killed runs left
            _remove_temporaries(out)
        if dataset == "demo":
            from .sources import demo

            root = demo.build(root or out / "_source", seed=options.seed)
        if root is None:
            raise LayoutError("--root is required for every data set but demo")
        reader = get_reader(dataset)
        unknown = sorted(set(reader_options) - set(reader.options))
        if unknown:
            raise LayoutError(f"--{unknown[0]} does not apply to --dataset {dataset}")
        records, skipped = reader.read(root, **reader_options)
        if not records:
            raise LayoutError(f"{root}: no labelled images found")
        if overwrite:
            _remove_outputs(out)
        _claim(out, inputs_record(dataset, root, records, skipped, options))
        if options.shuffle:  # readers list synthetic sets reference by reference
            records = [records[i] for i in np.random.default_rng(options.seed).permutation(len(records))]
        rows, bad = write_shards(records, out, dataset, options, workers, part or (0, 1))
        skipped += bad
        report = {"dataset": dataset, "root": str(root), "packed": len(rows),
                  "skipped": [dataclasses.asdict(s) for s in skipped]}
        if not sliced:
            finish(rows, reader.info, options, root, out, len(skipped))
        atomic.write_text(out / _report_name(part), json.dumps(report, indent=1))
        return report


@contextlib.contextmanager
def _owned(out: Path, sliced: bool) -> Iterator[None]:
    """One pack at a time writes to an ``--out``: a second would clear the first's temporaries
    and interleave its shards. Slices of an array job share it by design."""
    if sliced:
        yield
        return
    try:
        lock = RunLock(out).acquire()
    except LockedError as err:
        raise PackError(str(err).replace("another run", "another pack").replace("--run_dir", "--out")) from None
    try:
        yield
    finally:
        lock.release()


def _report_name(part: tuple[int, int] | None) -> str:
    return "pack_report.json" if part is None else f"pack_report.part{part[0]}of{part[1]}.json"


def finish(rows: list[dict], info: DatasetInfo, options: PackOptions, root: Path, out: Path,
           skipped: int) -> None:
    """Splits, manifest, ``_info.json`` and card from the rows of all shards."""
    rows = sorted(rows, key=lambda r: (r["shard"], r["key"]))
    for name, values in split_columns(rows, info, options).items():
        for row, value in zip(rows, values):
            row[name] = value
    write_manifest(rows, out)
    atomic.write_text(out / "_info.json", json.dumps(info_json(rows, info, options.rounds), indent=1))
    c = card(rows, info, options, root, skipped)
    atomic.write_text(out / "card.json", json.dumps(c, indent=1))
    atomic.write_text(out / "card.md", card_markdown(c))


def merge(dataset: str, out: Path, options: PackOptions) -> dict:
    """Join the slices written by ``--slice I/N`` jobs into one manifest and report, once
    every shard that the slices' inputs record promises is there."""
    inputs = recorded_inputs(out)
    differences = _differences(inputs, {"dataset": dataset, "options": _shard_options(options)})
    if differences:
        raise PackError(f"{out}: the slices were packed with other settings "
                        f"({'; '.join(differences)}); merge with the slices' options")
    rows, bad = [], []
    for done in _finished_shards(out, dataset, inputs["num_shards"]):
        rows += done["rows"]
        bad += done["skipped"]
    if len(rows) + len(bad) != inputs["num_images"]:
        raise PackError(f"{out}: the shards hold {len(rows) + len(bad)} of the "
                        f"{inputs['num_images']} images that {INPUTS} records")
    skipped = inputs["label_skipped"] + bad  # as one pack reports them: label rows, then images
    _remove_temporaries(out)  # every slice is done: nothing writes here any more
    root = Path(inputs["root"])
    finish(rows, get_reader(dataset).info, options, root, out, len(skipped))
    report = {"dataset": dataset, "root": str(root), "packed": len(rows), "skipped": skipped}
    atomic.write_text(out / "pack_report.json", json.dumps(report, indent=1))
    return report


def _finished_shards(out: Path, dataset: str, count: int) -> list[dict]:
    """The rows files of shards 0..count-1, or a PackError naming those not finished."""
    names = [shard_name(dataset, j) for j in range(count)]
    missing = [n for n in names
               if not ((out / n).exists() and (out / n).with_suffix(".rows.json").exists())]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise PackError(f"{out}: cannot merge, {len(missing)} of {count} shards missing ({shown}); "
                        "run their --slice jobs again")
    done = [json.loads((out / n).with_suffix(".rows.json").read_text()) for n in names]
    return [{**d, "rows": _stamped(d["rows"], out / n)} for d, n in zip(done, names)]


# The seed trains on KonIQ-10k resized as its torchvision Resize((512, 384)) does; other
# sets keep their pixels, which their labels were given for
DEFAULT_RESIZE = {"koniq-10k": "seed"}
# The demo's 19 photographs: 0.1 would validate on 2 of them, too few to select with
DEFAULT_SPLIT = {"demo": (0.6, 0.2, 0.2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m iqa_dist.pack", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--dataset", required=True,
                   help="koniq-10k, livec, spaq, csiq, tid2013, kadid-10k, live, csv or demo")
    p.add_argument("--root", type=Path, help="the data set as downloaded (demo: where to build it)")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. shards/NAME")
    p.add_argument("--image_root", type=Path,
                   help="csv: the folder the label file's names are relative to (default: --root)")
    p.add_argument("--resize",
                   help="none (original pixels), seed (the seed's Resize((512, 384)): 384 wide x "
                        "512 tall, bilinear, any set), koniq (512x384 by orientation, bicubic), or "
                        "short:N (short side N); default: seed for koniq-10k, none for the others")
    p.add_argument("--lossy_quality", type=int, default=0,
                   help="store resized or converted images as JPEG of this quality (default: PNG)")
    p.add_argument("--shard_size", type=int, default=500, help="images per shard")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the image order in the shards, of the splits and of the demo set")
    p.add_argument("--no_shuffle", action="store_true",
                   help="keep the reader's image order in the shards (default: a seeded shuffle)")
    p.add_argument("--rounds", type=int, default=10,
                   help="seeded split rounds in the manifest (a set with an official split: that split in each)")
    p.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of split units (default 0.7 0.1 0.2; demo: 0.6 0.2 0.2)")
    p.add_argument("--max_bad", type=int, default=0,
                   help="exit non-zero when more images than this were skipped")
    p.add_argument("--slice", type=slice_arg, help="I/N: write only every N-th shard starting at I (array jobs)")
    p.add_argument("--merge", action="store_true", help="join the slices' rows into the manifest")
    p.add_argument("--overwrite", action="store_true",
                   help="remove what an earlier pack wrote to --out and pack again (default: "
                        "continue it, refusing when its inputs or options differ)")
    p.add_argument("--verify", action="store_true", help="check the shards against the manifest")
    args = p.parse_args(argv)
    if args.resize is None:
        args.resize = DEFAULT_RESIZE.get(args.dataset, "none")
    try:
        check_resize(args.resize)
    except ValueError as err:
        p.error(f"--{err}")
    if args.split is None:
        args.split = DEFAULT_SPLIT.get(args.dataset, PackOptions.split)
    problem = argument_problem(args)
    if problem:  # before anything is written: a refused run must not leave pack_inputs.json behind
        p.error(problem)
    return args


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the numbers, in one line, or None."""
    for name, low in (("shard_size", 1), ("rounds", 1), ("workers", 0), ("max_bad", 0), ("lossy_quality", 0)):
        if getattr(args, name) < low:
            return f"--{name} {getattr(args, name)}: must be >= {low}"
    if args.lossy_quality > 100:
        return f"--lossy_quality {args.lossy_quality}: must be <= 100"
    if any(not 0 <= f <= 1 for f in args.split) or not math.isclose(sum(args.split), 1.0, abs_tol=1e-6):
        return f"--split {' '.join(map(str, args.split))}: three fractions in 0-1 that add up to 1"
    return None  # --resize is checked by its argparse type


def slice_arg(text: str) -> tuple[int, int]:
    """``I/N`` (0 <= I < N): this job writes slice I of N."""
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit()) or not int(i) < int(n):
        raise argparse.ArgumentTypeError(f"{text!r}: must be I/N with 0 <= I < N, e.g. 0/4")
    return int(i), int(n)


def _failure(err: Exception, out: Path) -> str:
    """What went wrong, in one line; a full disk names the output folder and its free space
    (the errno's own text names neither, nor what survives)."""
    if not atomic.disk_full(err):
        return str(err)
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    return (f"{out}: no space left on its device ({free / 1e6:.0f} MB free); the finished shards are kept; "
            "free space and run the same command")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = PackOptions(resize=args.resize, lossy_quality=args.lossy_quality,
                          shard_size=args.shard_size, seed=args.seed, shuffle=not args.no_shuffle,
                          rounds=args.rounds,
                          split=tuple(args.split))
    try:
        report = _run(args, options)
        problems = verify(args.out) if args.verify else []
    except (LayoutError, BadImage, OSError, ValueError) as err:  # OSError: a full disk, a read-only --out
        print(f"error: {_failure(err, args.out)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the finished shards in {args.out} are kept; the same command continues",
              file=sys.stderr)
        return 130
    for s in report["skipped"]:
        print(f"skipped {s['where']}: {s['reason']}", file=sys.stderr)
    if args.verify:
        for problem in problems:
            print(f"verify: {problem}", file=sys.stderr)
        print(f"verify: {'OK' if not problems else f'{len(problems)} problems'} in {args.out}")
        if problems:
            return 1
    if "packed" in report:
        print(f"packed {report['packed']} images into {args.out} "
              f"({len(report['skipped'])} skipped, listed in pack_report.json)")
    if len(report["skipped"]) > args.max_bad:
        print(f"error: {len(report['skipped'])} images skipped, more than --max_bad {args.max_bad}",
              file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace, options: PackOptions) -> dict:
    """Merge, pack or nothing (a bare --verify); the report."""
    if args.merge:
        return merge(args.dataset, args.out, options)
    if args.verify and args.root is None and args.dataset != "demo":
        return {"skipped": []}  # verify what is there, pack nothing
    part = args.slice
    reader_options = {"image_root": args.image_root} if args.image_root else {}
    return pack(args.dataset, args.root, args.out, options, args.workers, part, args.overwrite,
                **reader_options)


if __name__ == "__main__":
    sys.exit(main())

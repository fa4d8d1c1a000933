"""Evaluate a model on packed sets: every image once across ranks, one score per image.

As a command, a trained model's cross-data-set tests:

    python -m iqa_dist.evaluate --checkpoint runs/koniq-tiny --shards shards/spaq shards/csiq
    accelerate launch --config_file launch/cpu_2proc.yaml -m iqa_dist.evaluate --checkpoint ... --shards ...

Per set: SRCC, PLCC (raw and after a logistic fit), KRCC and RMSE of the per-image
scores (mean over the trained configuration's deterministic crops). A set whose labels
run the other way from the training labels (DMOS vs MOS, from the sets' cards) is
correlated against its negated labels ("flipped"), so a good model is positive on every
set. Ranks share the images: each is scored exactly once.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator

from .config import Config, from_dict
from .data.stream import ShardError, Split, load_split
from .images import max_pixels
from .runtime import make_accelerator, shards_path
from .scoring import card_of, gather_all, local_predictions, same_direction, split_metrics, training_resize
from .tools import check_out, load_trained, markdown_table


# ---------------------------------------------------------------- command line: cross-data-set tests

RESULT_COLUMNS = ("set", "split", "images", "srcc", "plcc", "plcc_logistic", "krcc", "rmse",
                  "direction", "label", "per_rank")


@dataclass
class SetResult:
    row: dict  # RESULT_COLUMNS and more
    preds: dict[str, tuple[float, float]]  # image key: (prediction, raw label)


def _label_text(card: dict) -> str:
    direction = "higher is better" if card.get("higher_is_better", True) else "lower is better"
    return f"{card.get('label_name', 'label')} ({direction})"


def evaluate_set(model: torch.nn.Module, name: str, split: Split, cfg: Config, accelerator: Accelerator,
                 trained_card: dict, batch_size: int | None = None, resize: str = "none") -> SetResult:
    """Metrics of one set's split, its images resized first by pack's policy ``resize``
    (the training set's: ``training_resize``); every rank must call it (predictions are gathered)."""
    card = card_of(split.root)
    local = local_predictions(model, split, cfg, accelerator, batch_size, resize)
    scored = gather_all(accelerator, local)
    per_rank = gather_all(accelerator, [len(local)])
    preds = {k: (p, label) for k, p, label in scored}
    same = same_direction(trained_card, card)
    row = {"set": name, "split": split.name, "images": len(preds), "scored": len(scored),
           "per_rank": "/".join(map(str, per_rank)), "direction": "same" if same else "flipped",
           "label": _label_text(card), "path": str(split.root), **split_metrics(preds, same)}
    return SetResult(row, preds)


def _set_names(roots: list[Path]) -> list[str]:
    """Folder names, made unique (they name the scatter plots)."""
    names: list[str] = []
    for root in roots:
        name = root.name or "set"
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def default_out(weights: Path) -> Path:
    """<run dir>/evaluate for a run's best weights, else next to the weights file."""
    best = weights.parent
    if best.name == "best" and best.parent.name == "checkpoints":
        return best.parent.parent / "evaluate"
    return best / "evaluate"


def write_results(out: Path, results: list[SetResult], header: str) -> None:
    from .plots import scatter  # matplotlib, only when plots are written

    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row for r in results]
    pq.write_table(pa.Table.from_pylist(rows), out / "results.parquet")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    notes = ("\n\n`flipped`: the set's labels run the other way from the training labels (e.g. DMOS "
             "vs MOS); its correlations are taken against the negated labels. RMSE is on the raw "
             "values: it means something only on the training labels' scale.\n")
    (out / "results.md").write_text(header + "\n\n" + markdown_table(rows, RESULT_COLUMNS) + notes)
    pq.write_table(pa.Table.from_pylist(
        [{"set": r.row["set"], "key": k, "prediction": p, "label": y}
         for r in results for k, (p, y) in sorted(r.preds.items())]), out / "predictions.parquet")
    for r in results:
        if r.preds:
            title = f"{r.row['set']} ({r.row['split']}): SRCC {r.row['srcc']:.3f}"
            scatter(r.preds, out / f"scatter_{r.row['set']}.png", title)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/best, or a model.safetensors next to config.yaml")
    p.add_argument("--shards", nargs="+", required=True,
                   help="packed sets: paths, names under shards_root, or URLs (http(s)://, s3://, pipe:CMD {})")
    p.add_argument("--cache_dir", help="where sets from URLs are staged (default: the trained config's, "
                                       "else $IQA_CACHE or ~/.cache/iqa_dist)")
    p.add_argument("--split", default="all", choices=("all", "test", "val", "train"))
    p.add_argument("--round", type=int, help="split round (default: the trained config's)")
    p.add_argument("--out", type=Path, help="output folder (default: <run dir>/evaluate)")
    p.add_argument("--batch_size", type=int, help="crops per forward pass (default: the trained config's)")
    p.add_argument("--test_patch_num", type=int, help="crops per image (default: the trained config's)")
    p.add_argument("--workers", type=int, help="data loader processes per rank (default: the trained config's)")
    p.add_argument("--mixed_precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
                   help="auto: bf16 on GPUs that have it, else fp32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:

    args = _parse_args(argv)
    try:
        max_pixels()  # here, not in every loader worker
        trained = load_trained(args.checkpoint)
        check_out(args.out or default_out(trained.weights), folder=True)
        resize = training_resize(trained.card)
        overrides = {k: v for k, v in (("test_patch_num", args.test_patch_num), ("workers", args.workers),
                                       ("split_round", args.round), ("batch_size", args.batch_size),
                                       ("mixed_precision", args.mixed_precision),
                                       ("cache_dir", args.cache_dir)) if v is not None}
        cfg = from_dict(overrides, trained.cfg, where="")  # the config's ranges hold here too
        roots = [shards_path(cfg, s) for s in args.shards]
        splits = [load_split(root, args.split, cfg.split_round) for root in roots]
        for split in splits:
            split.check_shards()
            card_of(split.root)  # the label direction decides the sign of every correlation
            if not len(split):
                raise ShardError(f"{split.root}: the {split.name} split holds no image (round "
                                 f"{cfg.split_round}): nothing to evaluate")
    except (FileNotFoundError, ValueError, ShardError) as err:  # the same on every rank: all leave together
        print(f"error: {err}", file=sys.stderr)
        return 2
    accelerator = make_accelerator(cfg)
    model = trained.model.to(accelerator.device)
    results, failed = [], []
    for name, split in zip(_set_names(roots), splits):
        if accelerator.is_main_process:
            print(f"evaluating {name} ({split.name}: {len(split)} images) on "
                  f"{accelerator.num_processes} process(es)", flush=True)
        try:
            results.append(evaluate_set(model, name, split, cfg, accelerator, trained.card, resize=resize))
        except ShardError as err:  # a broken set costs its own result only
            failed.append(f"{name}: {err}")
            print(f"error: {failed[-1]}", file=sys.stderr, flush=True)
    if accelerator.is_main_process and results:
        out = args.out or default_out(trained.weights)
        header = (f"# Cross-data-set evaluation\n\nmodel: `{trained.weights}` ({cfg.model_size}), trained on "
                  f"{trained.card.get('name', '?')} ({_label_text(trained.card)}); split `{args.split}`, "
                  f"{cfg.test_patch_num} crops per image, {accelerator.num_processes} process(es)")
        header += "".join(f"\n\nnot evaluated: {f}" for f in failed)
        write_results(out, results, header)
        print(markdown_table([r.row for r in results], RESULT_COLUMNS))
        print(f"results in {out}")
    accelerator.end_training()
    if failed:
        print(f"{len(failed)} of {len(splits)} sets not evaluated (reasons above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

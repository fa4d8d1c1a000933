"""``bench sweep``: ASHA against a full grid on the demo set."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from .common import Result, target


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
    from ..tune import ray_cluster, run_sweep

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

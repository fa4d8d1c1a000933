"""PNG figures of a run: learning curves and predicted vs label on test."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(run_dir: Path, history: list[dict], test_preds: dict[str, tuple[float, float]]) -> None:
    if history:
        fig, (ax_loss, ax_srcc) = plt.subplots(1, 2, figsize=(10, 4))
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o")
        ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
        ax_srcc.plot(epochs, [h["val_srcc"] for h in history], marker="o", label="SRCC")
        ax_srcc.plot(epochs, [h["val_plcc"] for h in history], marker="s", label="PLCC")
        ax_srcc.set(xlabel="epoch", ylabel="correlation", title="validation")
        ax_srcc.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "curves.png", dpi=100)
        plt.close(fig)
    if test_preds:
        scatter(test_preds, run_dir / "test_scatter.png", "test split")


def scatter(preds: dict[str, tuple[float, float]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    p = [v[0] for v in preds.values()]
    y = [v[1] for v in preds.values()]
    ax.scatter(y, p, s=8, alpha=0.6)
    ax.set(xlabel="label", ylabel="prediction", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

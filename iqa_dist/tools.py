"""What the command-line tools share: a trained model from its checkpoint, tables, timing."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from safetensors import SafetensorError

from . import atomic
from .checkpoint import find_model_files, load_weights
from .config import Config, ConfigError, load_yaml
from .models import HyperIQA, create_model


class Trained(NamedTuple):
    model: HyperIQA  # in eval mode, on the CPU
    cfg: Config  # the configuration it was trained with
    card: dict  # label card of its training set ({} when the checkpoint has none)
    weights: Path


def model_from_config(cfg: Config, pretrained: bool = False) -> HyperIQA:
    """The model a configuration describes; its pretrained backbone weights only when asked
    (not when trained weights are loaded next): the local file if named, else timm's hub."""
    return create_model(cfg.model_size, multiscale=cfg.multiscale, attention_fusion=cfg.attention_fusion,
                        dropout_rate=cfg.dropout_rate, drop_path_rate=cfg.drop_path_rate,
                        pretrained=pretrained and bool(cfg.pretrained),
                        pretrained_path=cfg.pretrained_path if pretrained else None)


def load_trained(checkpoint: str | Path) -> Trained:
    """A run directory, its ``checkpoints/best``, or a weights file next to its config.yaml."""
    weights, config = find_model_files(checkpoint)
    if not config.exists():
        raise FileNotFoundError(f"{config}: missing; the trained configuration decides the model's "
                                "size and fusion")
    cfg = load_yaml(config)
    model = model_from_config(cfg)
    try:
        model.load_state_dict(load_weights(weights))
    except (RuntimeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{weights}: not weights of the {cfg.model_size!r} HyperIQA of {config} "
                         f"({first})") from None
    return Trained(model.eval(), cfg, _label_card(weights.parent / "metrics.json"), weights)


def _label_card(metrics: Path) -> dict:
    if not metrics.exists():
        return {}
    return json.loads(metrics.read_text()).get("label_card") or {}


def label_scale(card: dict) -> str:
    """E.g. "MOS on 0-100, higher is better" (the scale of the scores a model predicts)."""
    if not card:
        return "on the training labels' scale (no label card in the checkpoint)"
    direction = "higher is better" if card.get("higher_is_better", True) else "lower is better"
    scale = card.get("scale")
    span = f" on {scale[0]:g}-{scale[1]:g}" if scale else ""
    return f"{card.get('label_name', 'label')}{span} ({card.get('name', '?')}), {direction}"


# ---------------------------------------------------------------- tables


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table: readable in a terminal and in a report."""
    columns = list(columns or (rows[0] if rows else []))
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work: without it a timer measures only the launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device | str) -> np.ndarray:
    """Seconds of each of ``iters`` calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return np.array(times)


def time_stats_ms(seconds: np.ndarray) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"mean_ms": float(ms.mean()), "std_ms": float(ms.std()), "min_ms": float(ms.min()),
            "median_ms": float(np.median(ms)), "max_ms": float(ms.max())}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def checked_device(name: str | torch.device, flag: str = "--device") -> torch.device:
    """``name`` as a device; a ConfigError naming ``flag`` for a GPU that is not there."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} cuda: no GPU is visible")
    return device


def check_out(out: Path, folder: bool, example: str = "scores.csv or scores.parquet") -> None:
    """Refuse an output that cannot be written before any scoring: a file ``out`` that is a
    folder, a folder ``out`` that is a file, or a place without write permission."""
    if folder and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; give a folder for the results")
    if not folder and out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name such as {example}")
    try:
        atomic.check_writable(out if folder else out.parent)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot be written ({err.strerror or err})") from None

"""Fetch a backbone's ImageNet weights into one local file, on a machine with internet.

    python -m iqa_dist.weights --model_size base --out weights/
    # prints: pretrained_path: weights/swin_base_patch4_window7_224.safetensors

Compute nodes of many clusters have no internet: run this once on a login node, then put
the printed line in the training config; the run then loads the file with no network.
The file is the whole timm model (classifier included), as timm's hub serves it, so that
timm's own loader reads it as it reads the hub's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
from torch import nn

from .checkpoint import save_weights
from .config import FROM_SCRATCH_SIZES
from .models.backbones import BACKBONES, weights_file

HUB_SIZES = tuple(size for size in BACKBONES if size not in FROM_SCRATCH_SIZES)


def fetch(model_size: str) -> nn.Module:
    """The timm model of ``model_size`` with its hub weights (downloads, or timm's cache)."""
    spec = BACKBONES[model_size]
    return timm.create_model(spec.timm_name, pretrained=True, **spec.timm_kwargs)


def save(model: nn.Module, model_size: str, out: str | Path) -> Path:
    """``model``'s weights where ``pretrained_path`` will find them; the file's path."""
    path = weights_file(model_size, out)
    save_weights(model.state_dict(), path, metadata={"timm_name": BACKBONES[model_size].timm_name})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iqa_dist.weights", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--model_size", required=True, choices=HUB_SIZES)
    parser.add_argument("--out", type=Path, default=Path("weights"), help="folder of the file (default weights/)")
    args = parser.parse_args(argv)
    name = BACKBONES[args.model_size].timm_name
    try:
        model = fetch(args.model_size)
    except (OSError, RuntimeError, ValueError) as err:  # no network: the hub client's many error types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        print(f"error: cannot fetch {name} from timm's hub ({type(err).__name__}: {first}); run this "
              "on a machine with internet (a login node) and copy the file", file=sys.stderr)
        return 1
    try:
        path = save(model, args.model_size, args.out)
    except OSError as err:
        print(f"error: {args.out}: cannot write the weights ({err.strerror or err})", file=sys.stderr)
        return 1
    print(f"pretrained_path: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

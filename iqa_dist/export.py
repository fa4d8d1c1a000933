"""Export a trained HyperIQA as a whole-image scorer, for deployment without iqa_dist.

    python -m iqa_dist.export --checkpoint runs/koniq-tiny --format onnx --out koniq.onnx
    python -m iqa_dist.export --checkpoint runs/koniq-tiny --format torchscript --out koniq.pt

The graph takes ``images``: uint8 RGB [N, 3, H, W] (0-255), already resized as the
training set was packed, at the one size H x W it was exported for (``--size``; by
default the size the card's ``--resize`` gives), N free. It returns float32 ``scores``
[N] on the training labels' scale: each image's mean prediction over the crops
``predict`` takes from an H x W image (the trained ``test_patch_num`` on its grid), the
ImageNet normalisation and the crops inside the graph. The label card, the size and the
crop corners travel in the file (ONNX metadata ``iqa_dist``; TorchScript extra file
``iqa_dist.json``).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from . import atomic
from .data.stream import _normalisation, grid_positions
from .images import KONIQ_SIZE, SEED_SIZE
from .scoring import training_resize
from .tools import Trained, check_out, label_scale, load_trained

EXIT_ERROR = 2
FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}
# Pack's policies that give every image one size: (height, width); koniq keeps a photo's
# orientation, so landscape is the default and portrait photos need --size 512x384.
FIXED_SIZES = {"seed": SEED_SIZE[::-1], "koniq": KONIQ_SIZE[::-1]}


class WholeImage(nn.Module):
    """uint8 [N, 3, H, W] -> [N]: the mean of ``model`` over the crops at ``corners``."""

    def __init__(self, model: nn.Module, corners: list[tuple[int, int]], patch_size: int) -> None:
        super().__init__()
        self.model, self.corners, self.patch_size = model.eval(), corners, patch_size
        scale, shift = _normalisation(torch.device("cpu"))  # the numbers to_model_input uses
        self.register_buffer("scale", scale.clone())
        self.register_buffer("shift", shift.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mul(self.scale).add(self.shift)
        p = self.patch_size
        crops = torch.stack([x[:, :, y:y + p, c:c + p] for y, c in self.corners], dim=1)
        # -1, not N: the batch axis stays free in the exported graph
        scores = self.model(crops.reshape(-1, 3, p, p))
        return scores.view(-1, len(self.corners)).mean(dim=1)


def parse_size(text: str) -> tuple[int, int]:
    """"384x512" -> (384, 512): height x width."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text}: expected HEIGHTxWIDTH, e.g. 384x512") from None
    return h, w


def export_size(card: dict, size: str | None) -> tuple[int, int]:
    """--size, else the one size the training set's resize gives every image."""
    if size is not None:
        return parse_size(size)
    resize = training_resize(card)
    if resize not in FIXED_SIZES:
        raise ValueError(f"--size: needed, as the training set was packed with --resize {resize}, which "
                         "leaves images different sizes; give the size you will resize images to, e.g. 384x512")
    return FIXED_SIZES[resize]


def whole_image(trained: Trained, size: tuple[int, int], patch_num: int | None = None) -> WholeImage:
    """The scorer of H x W images, with predict's crops of an image of that size."""
    cfg, (h, w) = trained.cfg, size
    if cfg.test_random_crop:
        raise ValueError("the run scores with random crops (test_random_crop), seeded by each file's name: "
                         "a graph has none; export needs the deterministic grid")
    if min(h, w) < cfg.patch_size:
        raise ValueError(f"--size {h}x{w}: each side must be at least the {cfg.patch_size}-pixel crop")
    corners = grid_positions(h, w, cfg.patch_size, patch_num or cfg.test_patch_num)
    return WholeImage(trained.model, corners, cfg.patch_size)


def metadata(trained: Trained, scorer: WholeImage, size: tuple[int, int]) -> str:
    return json.dumps({"label_card": trained.card, "scale": label_scale(trained.card),
                       "lower_better": not trained.card.get("higher_is_better", True),
                       "input": {"dtype": "uint8", "layout": "NCHW RGB 0-255", "height": size[0], "width": size[1],
                                 "resize": training_resize(trained.card)},
                       "crops": {"size": scorer.patch_size, "corners": scorer.corners}})


def write_onnx(scorer: WholeImage, example: torch.Tensor, out: Path, meta: str, opset: int) -> None:
    import onnx  # the [export] extra

    with atomic.temporary(out) as tmp:
        # the TorchScript-based exporter: the dynamo one needs onnxscript, not a dependency
        torch.onnx.export(scorer, (example,), str(tmp), dynamo=False, input_names=["images"],
                          output_names=["scores"], dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}},
                          opset_version=opset)
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {"iqa_dist": meta})
        onnx.save(model, str(tmp))
        atomic.replace(tmp, out)


def write_torchscript(scorer: WholeImage, example: torch.Tensor, out: Path, meta: str) -> None:
    traced = torch.jit.trace(scorer, example, check_trace=False)
    with atomic.temporary(out) as tmp:
        torch.jit.save(traced, str(tmp), _extra_files={"iqa_dist.json": meta})
        atomic.replace(tmp, out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/best, or a model.safetensors next to config.yaml")
    p.add_argument("--out", type=Path, required=True, help="model.onnx or model.pt")
    p.add_argument("--format", choices=sorted(set(FORMATS.values())),
                   help="onnx or torchscript (default: from --out's suffix: .onnx, .pt or .ts)")
    p.add_argument("--size", help="HEIGHTxWIDTH of the images the graph takes (default: the card's resize, "
                                  "seed 512x384, koniq 384x512)")
    p.add_argument("--test_patch_num", type=int, help="crops per image (default: the trained config's)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    args = p.parse_args(argv)
    args.format = args.format or FORMATS.get(args.out.suffix.lower())
    if args.format is None:
        p.error(f"--out {args.out}: name a .onnx or .pt file, or give --format")
    if args.test_patch_num is not None and args.test_patch_num < 1:
        p.error("--test_patch_num must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_out(args.out, folder=False, example="model.onnx or model.pt")
        trained = load_trained(args.checkpoint)
        size = export_size(trained.card, args.size)
        scorer = whole_image(trained, size, args.test_patch_num)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    example = torch.zeros(2, 3, *size, dtype=torch.uint8)
    meta = metadata(trained, scorer, size)
    with warnings.catch_warnings():
        # the tracer warns of the model's shape checks and pool sizes: constants by design here
        warnings.simplefilter("ignore")
        if args.format == "onnx":
            write_onnx(scorer, example, args.out, meta, args.opset)
        else:
            write_torchscript(scorer, example, args.out, meta)
    print(f"{args.format} written to {args.out}: uint8 [N, 3, {size[0]}, {size[1]}] images -> [N] scores, "
          f"{label_scale(trained.card)}; {len(scorer.corners)} crops each")
    return 0


if __name__ == "__main__":
    sys.exit(main())

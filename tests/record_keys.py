"""The training run as users launch it, writing the image key of every patch each rank's
train step received: OUT/keys-rank-R.json holds one list of keys per epoch.

    accelerate launch --config_file launch/cpu_2proc.yaml tests/record_keys.py OUT TRAIN_ARGS...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

from accelerate import PartialState

from iqa_dist import train as train_module

out, args = Path(sys.argv[1]), sys.argv[2:]
epochs: list[list[str]] = []
real_batches = train_module.batches


def recorded(loader):
    """The loop takes an epoch's batches in one call; each batch goes to the train step as it is yielded."""
    epochs.append([])
    for images, labels, keys, bad in real_batches(loader):
        epochs[-1].extend(keys)
        yield images, labels, keys, bad


with mock.patch.object(train_module, "batches", recorded):
    code = train_module.main(args)
(out / f"keys-rank-{PartialState().process_index}.json").write_text(json.dumps(epochs))
sys.exit(code)

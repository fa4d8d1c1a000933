"""A few training steps on one fixed global batch, for the DDP and accumulation equivalence test.

    python tests/ddp_step.py OUT.safetensors GLOBAL_BATCH GRAD_ACCUM
    accelerate launch --config_file launch/cpu_2proc.yaml tests/ddp_step.py OUT GLOBAL_BATCH 1

Each rank (and each accumulation micro-step) takes its own slice of the global batch;
the final weights are written by rank 0.
"""
import sys
from pathlib import Path

import torch

from iqa_dist.checkpoint import save_weights
from iqa_dist.config import from_dict
from iqa_dist.optim import build_optimizer
from iqa_dist.tools import model_from_config
from iqa_dist.train import make_accelerator, set_determinism

out, global_batch, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = from_dict({"model_size": "micro", "dropout_rate": 0.0, "drop_path_rate": 0.0, "lr": 1e-3,
                 "grad_accum": accum, "grad_clip": 0.0, "threads": 1})
accelerator = make_accelerator(cfg)
set_determinism(cfg)
model = model_from_config(cfg)
model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg))
data = torch.Generator().manual_seed(0)
world, rank = accelerator.num_processes, accelerator.process_index
micro = global_batch // (world * accum)
for step in range(3):
    images = torch.randn(global_batch, 3, 224, 224, generator=data)
    labels = torch.rand(global_batch, generator=data)
    for k in range(accum):
        start = (k * world + rank) * micro
        with accelerator.accumulate(model):
            loss = torch.nn.functional.l1_loss(model(images[start:start + micro]), labels[start:start + micro])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
if accelerator.is_main_process:
    save_weights(accelerator.unwrap_model(model).state_dict(), Path(out))
    print(f"world {world}")
accelerator.end_training()

"""A few SGD steps on fixed data, for the DDP and accumulation equivalence test.

    python tests/ddp_step.py OUT.safetensors GLOBAL_BATCH GRAD_ACCUM
    accelerate launch --config_file launch/cpu_2proc.yaml tests/ddp_step.py OUT GLOBAL_BATCH 1

``global_batch_size`` is divided by the project's own rule (``config.for_world``); each
rank (and each accumulation micro-step) takes its own slice of the global batch. Plain
SGD keeps the comparison exact to float rounding: Adam would magnify the rounding of
near-zero gradients to a whole step. Rank 0 writes the initial and final weights.
"""
import sys
from pathlib import Path

import torch

from iqa_dist.checkpoint import save_weights
from iqa_dist.config import for_world, from_dict
from iqa_dist.tools import model_from_config
from iqa_dist.runtime import make_accelerator, set_determinism

out, global_batch, accum = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = from_dict({"model_size": "micro", "dropout_rate": 0.0, "drop_path_rate": 0.0,
                 "global_batch_size": global_batch, "grad_accum": accum, "threads": 1})
accelerator = make_accelerator(cfg)
cfg = for_world(cfg, accelerator.num_processes)
set_determinism(cfg)
model = model_from_config(cfg)
initial = {k: v.clone() for k, v in model.state_dict().items()}
model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
data = torch.Generator().manual_seed(0)
world, rank, micro = accelerator.num_processes, accelerator.process_index, cfg.batch_size
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
    save_weights(accelerator.unwrap_model(model).state_dict(), out)
    save_weights(initial, out.with_name("initial-" + out.name))
    print(f"world {world} batch {micro}")
accelerator.end_training()

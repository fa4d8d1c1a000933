"""What a person reads while an epoch trains: a bar on a terminal; elsewhere (a SLURM
``.out`` file, a pipe) a plain line per log window, since a bar redraws itself with carriage
returns that a file keeps as one endless line."""
from __future__ import annotations

import sys
from datetime import timedelta

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, initial: int, desc: str, show: bool) -> None:
        self.total, self.desc = total, desc
        on_terminal = show and sys.stderr.isatty()  # the bar's stream
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        leave=False) if on_terminal else None
        self.lines = show and not on_terminal

    def update(self) -> None:
        """One step done."""
        if self.bar is not None:
            self.bar.update(1)

    def window(self, step: int, loss: float, lr: float, samples_s: float, eta_s: float) -> None:
        """A log window's mean loss, the lr now, the epoch's throughput and time left."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", samples_s=f"{samples_s:.0f}")
        elif self.lines:
            eta = timedelta(seconds=round(eta_s))
            print(f"{self.desc}  step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
                  f"{samples_s:.1f} samples/s  ETA {eta}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

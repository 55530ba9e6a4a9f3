"""Fault injection for the fault-tolerance tests: `DINREC_FAULT=<point>:<rank>:<step>` makes rank
`rank` fail at `point` of step `step`, once per output directory (a marker file there remembers
that it fired, so the restarted run goes through):

- `kill`: the worker kills itself with SIGKILL after training step `step`, as a lost machine would;
- `checkpoint`: SIGKILL while checkpoint `step` is being written (its shards are on disk, its
  manifest is not);
- `nan`: the loss of step `step` becomes NaN (the non-finite loss guard must stop the run);
- `stall`: after training step `step` the worker sleeps (the other ranks wait for it in the next
  collective), so that a test can take its machine away at a known point;
- `damage`: after training step `step`, one byte in the middle of the largest file of the newest
  checkpoint is flipped, then SIGKILL (a restart must skip that checkpoint for an intact one).

Unset, every call is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from trainer import storage


def _armed(point: str, rank: int, step: int, out_dir: str | Path) -> bool:
    spec = os.environ.get("DINREC_FAULT")
    if not spec or spec != f"{point}:{rank}:{step}":
        return False
    marker = storage.join(str(out_dir), f".fault-{point}-{rank}-{step}")
    if storage.exists(marker):
        return False
    storage.write_bytes(marker, b"")
    return True


def point(name: str, rank: int, step: int, out_dir: str | Path) -> None:
    """SIGKILL this process if DINREC_FAULT names this point (kill, checkpoint)."""
    if _armed(name, rank, step, out_dir):
        os.kill(os.getpid(), signal.SIGKILL)


def step_end(rank: int, step: int, out_dir: str | Path) -> None:
    """The faults that fire after a training step: `kill` and `damage`."""
    point("kill", rank, step, out_dir)
    if _armed("stall", rank, step, out_dir):
        time.sleep(3600)
    if _armed("damage", rank, step, out_dir):
        found = storage.sizes(storage.join(str(out_dir), "checkpoints"), recursive=True)
        checkpoints = sorted({storage.join(str(out_dir), "checkpoints", f.split("/")[0]) for f in found if "/" in f})
        if checkpoints:
            sizes = storage.sizes(checkpoints[-1])
            largest = storage.join(checkpoints[-1], max(sizes, key=sizes.get))
            data = bytearray(storage.read_bytes(largest))
            data[len(data) // 2] ^= 0xFF
            storage.write_bytes(largest, bytes(data))
        os.kill(os.getpid(), signal.SIGKILL)


def poison(loss, rank: int, step: int, out_dir: str | Path):
    """The loss, or NaN in its place if DINREC_FAULT names `nan` at this step."""
    return loss * float("nan") if _armed("nan", rank, step, out_dir) else loss

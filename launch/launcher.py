"""The one way every command and experiment starts training: `run(cfg)` through the config's
launcher (`launch.launcher`): a local Ray with `launch.workers` Ray Train workers (launch/ray_train.py),
or this process alone (`local`). torchrun (launch/torchrun.py) runs the same worker function,
trainer.loop.train, in each of its processes.
"""

from __future__ import annotations

from launch import ray_train
from trainer.config import Config
from trainer.loop import train


def run(cfg: Config, progress: bool = False) -> dict:
    """Train `cfg` through its launcher; the final metrics of rank 0."""
    if cfg.launch.launcher == "local":
        return train(cfg, progress=progress)
    return ray_train.run(cfg, cfg.launch.ray_address, progress=progress)

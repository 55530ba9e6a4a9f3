"""Which checkpoint a run starts from, and which run it belongs to.

A run tags its checkpoints with a run id. A launcher that restarts its workers (Ray Train's
`max_failures`, torchrun's `--max-restarts`) hands the restarted workers the id of the run they
continue, so they pick up that run's newest checkpoint; `train.resume` (`--resume`) continues
any run's; a fresh run refuses an out_dir that already holds checkpoints.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from trainer import checkpoint
from trainer.config import Config, ConfigError


def run_identity(run_id: str | None) -> tuple[str, str | None]:
    """(the id this run's checkpoints are tagged with, the id whose checkpoints it continues).

    Ray: the driver's id for the whole run (a restarted worker group finds the checkpoints its
    predecessor wrote). torchrun: TORCHELASTIC_RUN_ID, continued only on a restart
    (TORCHELASTIC_RESTART_COUNT > 0). A local run: a fresh id, nothing continued.
    """
    if run_id is not None:
        return run_id, run_id
    if "TORCHELASTIC_RUN_ID" in os.environ:
        tag = os.environ["TORCHELASTIC_RUN_ID"]
        return tag, tag if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 else None
    return uuid.uuid4().hex, None


def resume_point(cfg: Config, continue_id: str | None) -> Path | None:
    """The checkpoint this run starts from: the newest of its own launcher run after a restart,
    else train.resume; None for a fresh run, which must not start over another run's checkpoints."""
    base = checkpoint.root(cfg.train.out_dir)
    if continue_id is not None:
        found = checkpoint.latest(base, continue_id)
        if found is not None:
            return found
    if cfg.train.resume:
        return checkpoint.resolve(cfg.train.resume, cfg.train.out_dir)
    existing = checkpoint.latest(base)
    if existing is not None:
        raise ConfigError(
            f"{cfg.train.out_dir}: holds the checkpoints of an earlier run (newest: {existing.name}); "
            "continue it with --resume latest, or train into another train.out_dir"
        )
    return None

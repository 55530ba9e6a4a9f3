"""Model checkpoints with torch.distributed.checkpoint (sharded, reshardable).

A checkpoint is a directory: DCP shards of the model state and of the fused sparse optimizer's
per-row state (row-wise Adagrad sums, MBA counts n_j; sharded like their tables), `config.yaml`
(the run's merged config) and `meta.json` written last. It is written into `<dir>.tmp` and
renamed into place, so a half-written checkpoint is never picked up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn

from trainer.config import Config, ConfigError, config_from_dict


def sparse_optimizer_state(model: nn.Module) -> dict:
    """The fused optimizer's tensor states, flat ("<param>/<state>" -> sharded tensor). They wrap
    the live buffers, so loading into them restores the optimizer in place."""
    fused = getattr(model, "fused_optimizer", None)
    if fused is None:
        return {}
    return {f"{param}/{name}": value for param, states in fused.state_dict()["state"].items()
            for name, value in states.items()}


def save(path: str | Path, model: nn.Module, cfg: Config, meta: dict) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({"model": model.state_dict(), "sparse_optimizer": sparse_optimizer_state(model)},
             checkpoint_id=str(tmp))
    if rank == 0:
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        old = path.with_name(path.name + ".old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "meta.json").is_file():  # meta.json is written last: no meta, no checkpoint
        raise ConfigError(f"{path}: not a dinrec checkpoint (no meta.json)")
    return path


def read_config(path: str | Path) -> Config:
    path = _checkpoint_dir(path)
    return config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))


def load(path: str | Path, model: nn.Module) -> dict:
    """Load the model state in place (whatever its sharding now); return the checkpoint's meta."""
    path = _checkpoint_dir(path)
    state = {"model": model.state_dict()}
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    opt = sparse_optimizer_state(model)
    if opt and any(k.startswith("sparse_optimizer.") for k in saved):
        state["sparse_optimizer"] = opt  # loaded in place into the live optimizer buffers
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    return json.loads((path / "meta.json").read_text())

"""Evaluation: exact AUC, GAUC (DIN paper Eq. 10) and logloss over every rank's share of the test
set, gathered across ranks; the same for a checkpoint (`dinrec eval`).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from tqdm import tqdm

from trainer import checkpoint, metrics
from trainer.config import Config
from trainer.data import ParquetStream, stream_from_config
from trainer.ranks import on_rank_zero
from trainer.sharding import build_model, process_group, worker_device


def average_buffers(model: nn.Module, world: int) -> None:
    """Make the replicated buffers (Dice's running statistics) the mean over ranks.

    torchrec's DDP does not broadcast buffers, so each rank's running statistics follow its own
    batches. Their lerp updates are linear, so the mean over ranks of the running means is the
    running mean of the global batches' means; the same for the variances (without the spread
    between ranks' means). Done before every evaluation and checkpoint: every rank then evaluates
    with the same statistics, and the checkpoint (which stores one copy) holds what every rank had.
    """
    if world == 1:
        return
    state = model.state_dict()
    for name, buf in model.named_buffers():
        if name in state and buf.is_floating_point() and not isinstance(state[name], ShardedTensor):
            dist.all_reduce(buf)
            buf.div_(world)


@torch.no_grad()
def evaluate(
    model: nn.Module, stream: ParquetStream, progress: bool = False, device: torch.device | None = None
) -> dict:
    """Exact AUC, GAUC (Eq. 10) and logloss over every rank's share of the eval set."""
    model.eval()
    device = device or torch.device("cpu")
    probs, labels, users, oracle = [], [], [], []
    with tqdm(
        total=stream.rows_for(0), unit="samples", unit_scale=True, desc="eval", disable=not progress, mininterval=1.0
    ) as bar:
        for batch in stream.epoch(0):
            probs.append(torch.sigmoid(model(batch.to(device))).cpu().numpy())
            labels.append(batch.labels.numpy())
            users.append(batch.users.numpy())
            if batch.p_click is not None:
                oracle.append(batch.p_click.numpy())
            bar.update(len(batch))
    local = [np.concatenate(x) if x else np.zeros(0) for x in (probs, labels, users, oracle)]  # each row once
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        local = [np.concatenate([g[i] for g in gathered]) for i in range(4)]
    p, y, u, o = local
    result = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.summarize(y, p, u).items()}
    if o.size == y.size and y.size:
        result["oracle_auc"] = round(metrics.auc(y, o), 6)
    return result


def evaluate_checkpoint(cfg: Config, path: str, progress: bool = True) -> dict:
    """Rebuild the config's model, load a checkpoint into it (any sharding), evaluate the test set."""
    with process_group(cfg) as (rank, world):
        device = worker_device(cfg)
        model = build_model(cfg, world, device)
        found = on_rank_zero(lambda: checkpoint.find(path))
        if rank == 0:
            for p, why in found.skipped:
                print(checkpoint.skipped_note(p, why, f"evaluating {found.path}"), file=sys.stderr)
        meta = checkpoint.load(found.path, model, verified=True)
        result = evaluate(model, stream_from_config(cfg, "test", rank, world), progress and rank == 0, device)
        result.update(model=cfg.model.name, checkpoint=str(found.path), step=meta.get("step"))
        if found.skipped:
            result["skipped_checkpoints"] = [{"checkpoint": str(p), "why": why} for p, why in found.skipped]
        return result

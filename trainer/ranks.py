"""Decisions one rank takes for all: rank 0 reads and checks (files, checkpoints), the other ranks
get its answer, so that every rank takes the same branch and no collective is left waiting."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from trainer.config import ConfigError

T = TypeVar("T")


def on_rank_zero(fn: Callable[[], T]) -> T:
    """fn() on rank 0, its value (or its ConfigError) handed to every rank."""
    box: list = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except ConfigError as e:
            box[0] = ("config", str(e))
        except Exception as e:  # noqa: BLE001 - the other ranks must not wait for an answer forever
            box[0] = ("crash", f"{type(e).__name__}: {e}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "config":
        raise ConfigError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0: {value}")
    return value

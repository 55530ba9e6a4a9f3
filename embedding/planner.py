"""Sharding plans from torchrec's planner: a pure function of (tables, topology, batch size)."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan

from embedding.tables import FeatureLayout


def constraints_for(layout: FeatureLayout) -> dict[str, ParameterConstraints]:
    """Every table on FBGEMM's fused kernel, so that its optimizer runs inside the backward pass,
    with the sharding types its config allows.

    (A data-parallel table would get the dense kernel, whose in-backward optimizer hooks do not
    survive sharding; the fused kernel keeps one update path for every table.)
    """
    fused = [EmbeddingComputeKernel.FUSED.value]
    return {
        t.name: ParameterConstraints(compute_kernels=fused, sharding_types=list(t.sharding_types) or None)
        for t in layout.seq_tables + layout.pooled_tables
    }


def plan_on_the_fly(
    model: nn.Module,
    layout: FeatureLayout,
    sharders: list,
    world_size: int,
    batch_size: int,
    compute_device: str = "cpu",
    pg: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """Plan on rank 0 and broadcast the plan to every rank."""
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=compute_device),
        batch_size=batch_size,
        constraints=constraints_for(layout),
    )
    return planner.collective_plan(model, sharders, pg)

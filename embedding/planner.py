"""Sharding plans from torchrec's planner: a pure function of (tables, topology, batch size)."""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import (
    EmbeddingPerfEstimator,
    EmbeddingStorageEstimator,
)
from torchrec.distributed.types import ShardingPlan

from embedding.tables import FeatureLayout


def constraints_for(layout: FeatureLayout) -> dict[str, ParameterConstraints]:
    """Every table on an FBGEMM fused kernel (the config's `compute_kernel`), so that its optimizer
    runs inside the backward pass, with the sharding types and min partition its config gives.

    (A data-parallel table would get the dense kernel, whose in-backward optimizer hooks do not
    survive sharding; the fused kernel keeps one update path for every table.)
    """
    return {
        t.name: ParameterConstraints(compute_kernels=[EmbeddingComputeKernel(t.compute_kernel).value],
                                     sharding_types=list(t.sharding_types) or None, min_partition=t.min_partition)
        for t in layout.seq_tables + layout.pooled_tables
    }


MBA_BYTES_PER_ROW = 4  # n_j, int32, one per row of every shard (column-wise shards keep their own)


class MBAStorageEstimator(EmbeddingStorageEstimator):
    """torchrec's storage estimate plus the MBA count of every row of the tables that use MBA, on
    the memory that holds the shard (HBM on a GPU, DDR on the CPU)."""

    def __init__(self, topology: Topology, constraints: dict[str, ParameterConstraints] | None,
                 mba_tables: set[str]) -> None:
        super().__init__(topology=topology, constraints=constraints)
        self._mba_tables = set(mba_tables)

    def estimate(self, sharding_options, *args, **kwargs) -> None:
        super().estimate(sharding_options, *args, **kwargs)
        on_gpu = self._topology.compute_device == "cuda"
        for option in sharding_options:
            if option.name not in self._mba_tables:
                continue
            for shard in option.shards:
                extra = shard.size[0] * MBA_BYTES_PER_ROW
                shard.storage = dataclasses.replace(
                    shard.storage, hbm=shard.storage.hbm + (extra if on_gpu else 0),
                    ddr=shard.storage.ddr + (0 if on_gpu else extra))


def make_enumerator(layout: FeatureLayout, topology: Topology, batch_size: int,
                    mba: bool = False) -> EmbeddingEnumerator:
    """torchrec's enumerator with our constraints, estimating storage with the MBA counts."""
    constraints = constraints_for(layout)
    mba_tables = {t.name for t in layout.seq_tables + layout.pooled_tables} if mba else set()
    estimators = [EmbeddingPerfEstimator(topology=topology, constraints=constraints),
                  MBAStorageEstimator(topology, constraints, mba_tables)]
    return EmbeddingEnumerator(topology=topology, batch_size=batch_size, constraints=constraints,
                               estimator=estimators)


RESERVED_PERCENTAGE = 0.15  # torchrec's default share of each device kept from the tables


def make_planner(layout: FeatureLayout, topology: Topology, batch_size: int,
                 mba: bool = False, dense_bytes: int | None = None) -> EmbeddingShardingPlanner:
    """torchrec's planner with our constraints, the MBA counts in its storage estimate, and the
    dense side's measured memory (embedding/dense_memory.py) in its storage reservation instead
    of torchrec's heuristic (6 x the dense parameters, activations not counted)."""
    import warnings

    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation

    with warnings.catch_warnings():  # its FutureWarning recommends passing dense_tensor_estimate, as here
        warnings.simplefilter("ignore", FutureWarning)
        reservation = HeuristicalStorageReservation(RESERVED_PERCENTAGE, dense_tensor_estimate=dense_bytes)
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints_for(layout),
                                    enumerator=make_enumerator(layout, topology, batch_size, mba),
                                    storage_reservation=reservation)


def plan_on_the_fly(
    model: nn.Module,
    layout: FeatureLayout,
    sharders: list,
    world_size: int,
    batch_size: int,
    compute_device: str = "cpu",
    pg: dist.ProcessGroup | None = None,
    mba: bool = False,
    dense_bytes: int | None = None,
) -> ShardingPlan:
    """Plan on rank 0 and broadcast the plan to every rank."""
    topology = Topology(world_size=world_size, compute_device=compute_device)
    return make_planner(layout, topology, batch_size, mba, dense_bytes).collective_plan(model, sharders, pg)

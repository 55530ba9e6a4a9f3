"""Sharding plans from torchrec's planner: a pure function of (tables, topology, batch size).

Around torchrec's planner: our constraints (every table on an FBGEMM fused kernel), MBA's 4 bytes
per row in the storage estimate, the dense side's measured memory in the storage reservation
(a number the caller measures, trainer.dense_memory), the sharders with the MBA kernel, and, when
the tables do not fit, one line saying what is short and the smallest world size that fits.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import (
    EmbeddingPerfEstimator,
    EmbeddingStorageEstimator,
)
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan

from embedding import mba_tbe
from embedding.layout import FeatureLayout
from embedding.plan import gib
from trainer.config import ConfigError, SparseOptimizerConfig

MAX_WORLD = 4096  # the largest world size an infeasible plan is retried with


def constraints_for(layout: FeatureLayout, world_size: int) -> dict[str, ParameterConstraints]:
    """Every table on an FBGEMM fused kernel (the config's `compute_kernel`), so that its optimizer
    runs inside the backward pass, with the sharding types and min partition its config gives.

    (A data-parallel table would get the dense kernel, whose in-backward optimizer hooks do not
    survive sharding; the fused kernel keeps one update path for every table.)

    On one rank a table whose config names no sharding type is table-wise: every type keeps the
    whole table on that rank, and table-wise is the one without row-wise's bucketize of the ids
    and permute of the embeddings (whose backward is a scatter-add), which torchrec's planner
    sometimes picked there (docs/results.md, "CPU speed").
    """
    alone = ["table_wise"] if world_size == 1 else None
    return {
        t.name: ParameterConstraints(
            compute_kernels=[EmbeddingComputeKernel(t.compute_kernel).value],
            sharding_types=list(t.sharding_types) or alone,
            min_partition=t.min_partition,
        )
        for t in layout.tables
    }


MBA_BYTES_PER_ROW = 4  # n_j, int32, one per row of every shard (column-wise shards keep their own)


def extra_row_bytes(sopt: SparseOptimizerConfig) -> int:
    """The per-row optimizer state torchrec's storage estimate leaves out, in bytes per row of
    every shard: MBA's count n_j (int32), and partial row-wise Adam's row-wise v_j (fp32; torchrec
    counts its m only)."""
    return MBA_BYTES_PER_ROW * sopt.mba + 4 * (sopt.base == "partial_rowwise_adam")


class RowStateStorageEstimator(EmbeddingStorageEstimator):
    """torchrec's storage estimate plus `row_bytes` per row of every shard (`extra_row_bytes`), on
    the memory that holds the shard (HBM on a GPU, DDR on the CPU)."""

    def __init__(self, topology: Topology, constraints: dict[str, ParameterConstraints] | None, row_bytes: int) -> None:
        super().__init__(topology=topology, constraints=constraints)
        self._row_bytes = row_bytes

    def estimate(self, sharding_options, *args, **kwargs) -> None:
        super().estimate(sharding_options, *args, **kwargs)
        if not self._row_bytes:
            return
        on_gpu = self._topology.compute_device == "cuda"
        for option in sharding_options:
            for shard in option.shards:
                extra = shard.size[0] * self._row_bytes
                shard.storage = dataclasses.replace(
                    shard.storage,
                    hbm=shard.storage.hbm + (extra if on_gpu else 0),
                    ddr=shard.storage.ddr + (0 if on_gpu else extra),
                )


def make_enumerator(
    layout: FeatureLayout, topology: Topology, batch_size: int, row_bytes: int = 0
) -> EmbeddingEnumerator:
    """torchrec's enumerator with our constraints, estimating storage with `row_bytes` more per
    row (`extra_row_bytes`: the MBA counts, partial row-wise Adam's v)."""
    constraints = constraints_for(layout, topology.world_size)
    estimators = [
        EmbeddingPerfEstimator(topology=topology, constraints=constraints),
        RowStateStorageEstimator(topology, constraints, row_bytes),
    ]
    return EmbeddingEnumerator(topology=topology, batch_size=batch_size, constraints=constraints, estimator=estimators)


RESERVED_PERCENTAGE = 0.15  # torchrec's default share of each device kept from the tables


def make_planner(
    layout: FeatureLayout, topology: Topology, batch_size: int, row_bytes: int = 0, dense_bytes: int | None = None
) -> EmbeddingShardingPlanner:
    """torchrec's planner with our constraints, `row_bytes` per row in its storage estimate, and the
    dense side's measured memory (`dense_bytes`) in its storage reservation instead of
    torchrec's heuristic (6 x the dense parameters, activations not counted)."""
    with warnings.catch_warnings():  # its FutureWarning recommends passing dense_tensor_estimate, as here
        warnings.simplefilter("ignore", FutureWarning)
        reservation = HeuristicalStorageReservation(RESERVED_PERCENTAGE, dense_tensor_estimate=dense_bytes)
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints_for(layout, topology.world_size),
        enumerator=make_enumerator(layout, topology, batch_size, row_bytes),
        storage_reservation=reservation,
    )


def plan_on_the_fly(
    model: nn.Module,
    layout: FeatureLayout,
    sharders: list,
    world_size: int,
    batch_size: int,
    compute_device: str = "cpu",
    pg: dist.ProcessGroup | None = None,
    row_bytes: int = 0,
    dense_bytes: int | None = None,
) -> ShardingPlan:
    """Plan on rank 0 and broadcast the plan to every rank."""
    topology = Topology(world_size=world_size, compute_device=compute_device)
    return make_planner(layout, topology, batch_size, row_bytes, dense_bytes).collective_plan(model, sharders, pg)


def sharders_for(sopt: SparseOptimizerConfig) -> list:
    """torchrec's sharders of both collection kinds; their fused_params carry the entry that
    selects our kernel (embedding/mba_tbe.py): with an MBA optimizer, MBA; without, the plain
    optimizer, which `mba_tbe.install`'s routing gives our kernel on the CPU (FBGEMM has none for
    Adam there, and ours was measured faster for SGD and row-wise Adagrad), FBGEMM's on a GPU.
    `sparse_optimizer.kernel: fbgemm` keeps every plain optimizer on FBGEMM's kernels (where it
    has them).

    FBGEMM's check of every id against its table is off: the reader refuses an id out of range
    with its file and column (trainer.data), where FBGEMM's check would clamp it with a warning."""
    mba_tbe.install()
    fused = {"bounds_check_mode": BoundsCheckMode.NONE}
    if sopt.mba:  # MBA rides on the base optimizer's fused kernel
        fused[mba_tbe.MBA_KEY] = mba_tbe.MBAParams(lam=sopt.lam, counts=sopt.counts, kernel=sopt.kernel)
    elif sopt.kernel != "fbgemm" or sopt.base in mba_tbe.OWN_STATES:
        kernel = "auto" if sopt.kernel == "fbgemm" else sopt.kernel
        fused[mba_tbe.MBA_KEY] = mba_tbe.MBAParams(lam=0.0, counts="static", kernel=kernel, plain=True)
    return [EmbeddingCollectionSharder(fused_params=fused), EmbeddingBagCollectionSharder(fused_params=fused)]


def _topology(world_size: int, compute_device: str, hbm: int | None, ddr: int | None, local_world_size: int | None):
    kwargs = {"world_size": world_size, "compute_device": compute_device}
    if hbm is not None:
        kwargs["hbm_cap"] = hbm
    if ddr is not None:
        kwargs["ddr_cap"] = ddr
    if local_world_size is not None:
        kwargs["local_world_size"] = local_world_size
    return Topology(**kwargs)


def _try_plan(model, sharders, layout, topology, batch_size, row_bytes, dense_bytes):
    planner = make_planner(layout, topology, batch_size, row_bytes, dense_bytes)
    try:
        return planner.plan(model, sharders), planner
    except PlannerError:
        return None, planner


def plan_offline(
    model: nn.Module,
    sharders: list,
    layout: FeatureLayout,
    world_size: int,
    compute_device: str,
    batch_size: int,
    row_bytes: int,
    dense_bytes: int,
    hbm: int | None = None,
    ddr: int | None = None,
    local_world_size: int | None = None,
):
    """(plan, the planner's best sharding options, topology) for a model on meta (see
    trainer.sharding.model_on_meta); a one-line ConfigError when the tables do not fit."""
    topology = _topology(world_size, compute_device, hbm, ddr, local_world_size)
    plan, planner = _try_plan(model, sharders, layout, topology, batch_size, row_bytes, dense_bytes)
    if plan is None:
        raise ConfigError(
            _infeasible(
                row_bytes, model, sharders, layout, topology, batch_size, hbm, ddr, local_world_size, dense_bytes
            )
        )
    return plan, planner._best_plan or [], topology


def _infeasible(row_bytes, model, sharders, layout, topology, batch, hbm, ddr, local_world_size, dense_bytes) -> str:
    """One line: the biggest table against the memory the topology has, and the smallest world
    size at which the planner does find a plan."""
    mem = "hbm" if topology.compute_device == "cuda" else "ddr"
    options = make_enumerator(layout, topology, batch, row_bytes).enumerate(model, sharders)
    need: dict[str, int] = {}
    for o in options:  # the cheapest way to store each table
        total = sum(getattr(s.storage, mem) for s in o.shards)
        need[o.name] = min(need.get(o.name, total), total)
    cap = getattr(topology.devices[0].storage, mem)
    world = topology.world_size
    if dense_bytes >= cap * (1 - RESERVED_PERCENTAGE):  # replicated: no world size helps
        return (
            f"the dense side does not fit: it needs {gib(dense_bytes)} of {mem.upper()} on every rank (parameters, "
            f"gradients, optimizer state and activations at batch {batch} with full histories) but each rank has "
            f"{gib(cap)}, {gib(cap * (1 - RESERVED_PERCENTAGE))} after torchrec's {RESERVED_PERCENTAGE:.0%}; "
            f"a smaller --batch-size or more {mem.upper()} per rank"
        )

    def plans_at(w: int) -> bool:
        t = _topology(w, topology.compute_device, hbm, ddr, local_world_size)
        return _try_plan(model, sharders, layout, t, batch, row_bytes, dense_bytes)[0] is not None

    fits = None
    w = world * 2
    while w <= MAX_WORLD and fits is None:  # double until it fits, then the smallest in between
        if plans_at(w):
            lo, hi = w // 2, w
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if plans_at(mid) else (mid, hi)
            fits = hi
        w *= 2
    try:  # what the planner leaves for tables once torchrec reserves its share (dense, inputs, 15 %)
        reserved = make_planner(layout, topology, batch, row_bytes, dense_bytes)._storage_reservation.reserve(
            topology, batch, model, sharders, constraints_for(layout, topology.world_size)
        )
        usable = sum(getattr(d.storage, mem) for d in reserved.devices)
        avail = f"leave {gib(usable)} for tables after torchrec's reservation (dense side, inputs, 15%)"
    except (AttributeError, TypeError):
        avail = "are available (before torchrec's reservation for dense parameters and inputs)"
    big = max(need, key=need.get)
    where = f"world size {fits}" if fits else f"no world size up to {MAX_WORLD} (more memory per rank)"
    return (
        f"table '{big}' does not fit: it needs {gib(need[big])} of {mem.upper()} (all tables "
        f"{gib(sum(need.values()))}, optimizer state and MBA counts included) but {world} × {gib(cap)} "
        f"{avail}; the smallest that fits: {where}"
    )

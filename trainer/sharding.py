"""From a config to a sharded model on this process group: the process group and the device, the
model on the meta device with its sparse optimizer attached, the plan (a plan file, or torchrec's
planner on the fly with the dense side's measured memory reserved), DistributedModelParallel, the
tables' initial rows, MBA's static counts, and the dense optimizer. Also `plan_for`, the same
planning offline for `dinrec plan`.

Embedding tables go through DistributedModelParallel (FBGEMM fused kernels, the sparse optimizer
applied inside the backward pass); the dense tower is replicated under DDP (with more than one
rank: DataParallelAcrossRanks).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.types import ShardingPlan
from torchrec.optim import Adam, PartialRowWiseAdam, RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embedding import mba_tbe
from embedding.layout import FeatureLayout
from embedding.plan import load_plan, plan_document
from embedding.planner import extra_row_bytes, plan_offline, plan_on_the_fly, sharders_for
from embedding.tables import init_rows
from trainer.config import Config, ConfigError
from trainer.counts import load_counts
from trainer.dense_memory import dense_memory
from trainer.models import MODELS, gru_triton

DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SPARSE_OPTIMIZERS = {  # FBGEMM's fused kernels (Adam on the CPU: ours, embedding/mba_tbe.py)
    "sgd": torch.optim.SGD,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": Adam,
    "partial_rowwise_adam": PartialRowWiseAdam,
}


def sparse_optimizer_kwargs(cfg: Config) -> dict:
    """The sparse optimizer's arguments as torchrec hands them to FBGEMM (lr becomes learning_rate);
    torchrec's defaults for what the config leaves unset."""
    sopt = cfg.sparse_optimizer
    kwargs = {"lr": sopt.lr}
    if sopt.base != "sgd" and sopt.eps is not None:
        kwargs["eps"] = sopt.eps
    if "adam" in sopt.base:
        kwargs |= {"beta1": sopt.beta1, "beta2": sopt.beta2}
    return kwargs


def backend(cfg: Config) -> str:
    return "nccl" if cfg.launch.use_gpu else "gloo"


def store_on(addr: str, port: int, world_size: int, server: bool, timeout: float = 1800) -> dist.TCPStore:
    """A TCPStore whose server listens on `addr` only: torch's own takes no address to bind and
    listens on every interface. The server (port 0: a free one; `.port` says which), or a client."""
    wait = timedelta(seconds=timeout)
    if not server:
        return dist.TCPStore(addr, port, world_size, is_master=False, timeout=wait)
    sock = socket.create_server((addr, port), family=socket.AF_INET6 if ":" in addr else socket.AF_INET)
    port = sock.getsockname()[1]
    fd = sock.detach()  # the store owns (and closes) the socket; the libuv backend takes one
    kwargs = {"wait_for_workers": False, "master_listen_fd": fd, "use_libuv": True}
    return dist.TCPStore(addr, port, world_size, is_master=True, timeout=wait, **kwargs)


@contextmanager
def process_group(cfg: Config) -> Iterator[tuple[int, int]]:
    """The process group of this worker: the launcher's (launch.rendezvous sets one up under Ray
    Train), one from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or a
    1-process group on an in-process store for a local run (nothing listens). Groups made here are
    destroyed on exit."""
    if dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost"):  # one machine: loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store, rank, world = next(dist.rendezvous("env://"))
        # torchrun restarts (--max-restarts) may meet the keys of the attempt before in the store
        # (gloo then connects to a dead rank's address): each attempt has its own key space
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend(cfg), store=dist.PrefixStore(f"dinrec/attempt-{attempt}", store), rank=rank, world_size=world
        )
    else:  # one process: an in-process store, no server
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a one-process group stays on loopback
        dist.init_process_group(backend(cfg), store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def worker_device(cfg: Config) -> torch.device:
    """cuda:LOCAL_RANK with launch.use_gpu (torchrun and Ray Train set LOCAL_RANK), else the CPU."""
    if not cfg.launch.use_gpu:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def model_on_meta(cfg: Config) -> tuple[nn.Module, FeatureLayout]:
    """The config's model with its tables on the meta device (nothing allocated: DMP allocates each
    rank's shards; billion-row tables plan on a laptop) and the dense tower on the CPU, the sparse
    optimizer attached as in training so that the planner counts its state."""
    layout = FeatureLayout.from_config(cfg)
    model = MODELS[cfg.model.name](layout, cfg.model, len(cfg.data.dense_features), device=torch.device("meta"))
    sopt = cfg.sparse_optimizer
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[sopt.base], model.sparse.parameters(), sparse_optimizer_kwargs(cfg))
    return model, layout


def sharding_plan(
    cfg: Config, model: nn.Module, sharders: list, layout: FeatureLayout, world_size: int, device: torch.device
) -> ShardingPlan:
    """The plan file of `train.plan` (checked against this run), else torchrec's planner on rank 0,
    broadcast, with the same dense-side reservation as `dinrec plan`."""
    if cfg.train.plan:
        return load_plan(cfg.train.plan, cfg, world_size, device.type)
    dense = dense_memory(cfg, cfg.data.batch_size)
    return plan_on_the_fly(
        model,
        layout,
        sharders,
        world_size,
        cfg.data.batch_size,
        device.type,
        row_bytes=extra_row_bytes(cfg.sparse_optimizer),
        dense_bytes=sum(dense.values()),
    )


class DataParallelAcrossRanks(DefaultDataParallelWrapper):
    """torchrec's DDP over the dense side, where there is more than one rank: alone, a rank has no
    gradient to average, and DDP's hooks and all-reduce would only cost time."""

    def wrap(self, dmp, env, device) -> None:
        if env.world_size > 1:
            super().wrap(dmp, env, device)


def build_model(cfg: Config, world_size: int, device: torch.device) -> DistributedModelParallel:
    """The config's model with its tables sharded by a plan, initialised, with MBA's static counts
    loaded; sparse optimizer fused in the backward pass."""
    if cfg.model.name == "dien" and cfg.model.gru_kernel == "triton" and not gru_triton.available(device):
        raise ConfigError(
            "model.gru_kernel: triton runs on a GPU (launch.use_gpu=true), or on the CPU under TRITON_INTERPRET=1 "
            "with triton installed; use auto or cpp here"
        )
    torch.manual_seed(cfg.train.seed)
    model, layout = model_on_meta(cfg)
    sharders = sharders_for(cfg.sparse_optimizer)
    plan = sharding_plan(cfg, model, sharders, layout, world_size, device)
    dmp = DistributedModelParallel(
        model, device=device, plan=plan, sharders=sharders, data_parallel_wrapper=DataParallelAcrossRanks()
    )
    init_tables(dmp, layout, cfg.train.seed)
    if cfg.sparse_optimizer.mba and cfg.sparse_optimizer.counts == "static":
        load_static_counts(dmp, cfg)
    return dmp


INIT_CHUNK_ROWS = 1 << 20


def init_tables(model: nn.Module, layout: FeatureLayout, seed: int) -> None:
    """Give every local shard of every table its sharding-independent initial rows (see
    embedding.tables.init_rows), so that runs on any world size and plan start from the same
    weights."""
    tables = {t.name: t for t in layout.tables}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            name = key.rsplit(".", 2)[-2] if key.endswith(".weight") else None
            if name not in tables or not key.startswith("sparse."):
                continue
            if not isinstance(value, ShardedTensor):
                raise TypeError(f"{key}: expected a sharded table, got {type(value).__name__}")
            for shard in value.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                for a in range(0, nr, INIT_CHUNK_ROWS):  # by chunks: no second copy of a large shard
                    b = min(nr, a + INIT_CHUNK_ROWS)
                    shard.tensor[a:b].copy_(init_rows(tables[name], seed, r0 + a, r0 + b)[:, c0 : c0 + nc])


def load_static_counts(model: nn.Module, cfg: Config) -> None:
    """Fill every MBA shard's n_j with its rows of the `dinrec count-features` counts."""
    tables = {t.name: t for t in cfg.tables}
    cache: dict[str, np.ndarray] = {}
    for kernel, module in mba_tbe.mba_modules(model):
        for table, counts in zip(kernel.config.embedding_tables, module.counts_by_table(), strict=True):
            if table.name not in cache:
                full = load_counts(cfg, tables[table.name])
                if full.size and int(full.max()) >= 2**31:
                    raise ConfigError(f"table {table.name}: a count of {int(full.max())} exceeds MBA's int32 n_j")
                cache[table.name] = full
            r0 = table.local_metadata.shard_offsets[0]
            counts.copy_(torch.from_numpy(cache[table.name][r0 : r0 + counts.numel()].astype(np.int32)))


def dense_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The dense optimizer of the config over every parameter the fused sparse optimizer does not own."""
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    d = cfg.dense_optimizer
    # fused: torch's one-kernel step over every parameter (CPU and CUDA) instead of a few ops per
    # parameter, the largest cost of the Adam step at these models' sizes
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params.values())
    return DENSE_OPTIMIZERS[d.type](params.values(), lr=d.lr, weight_decay=d.weight_decay, fused=fused or None)


class AllRowsDecay:
    """Plain L2 on every row (sparse_optimizer.l2_all): scales every local shard by
    (1 − lr·l2_all). Run between the forward pass and the fused backward step, it makes the SGD
    step w − lr·(g + l2_all·w) exactly (the gradient was taken at the old weights); with row-wise
    Adagrad and Adam it is decoupled weight decay (AdamW's, on every row): (1 − lr·l2_all)·w minus
    the optimizer's step from g alone (s, or Adam's m and v, unchanged by it)."""

    def __init__(self, cfg: Config, model: nn.Module):
        sopt = cfg.sparse_optimizer
        self.factor = 1.0 - sopt.lr * sopt.l2_all
        self.shards = [
            shard.tensor
            for key, v in model.state_dict().items()
            if key.startswith("sparse.") and isinstance(v, ShardedTensor)
            for shard in v.local_shards()
        ]

    def __call__(self) -> None:
        # .data: FBGEMM's autograd node holds the weights only to update them in its backward, so
        # scaling them in between is the intended semantics, not a stale-gradient hazard
        for t in self.shards:
            t.data.mul_(self.factor)


def all_rows_decay(cfg: Config, model: nn.Module) -> AllRowsDecay | None:
    """The plain-L2 baseline's decay (sparse_optimizer.l2_all), or None when it is off."""
    return AllRowsDecay(cfg, model) if cfg.sparse_optimizer.l2_all else None


def plan_for(
    cfg: Config,
    world_size: int,
    compute_device: str = "cuda",
    hbm: int | None = None,
    ddr: int | None = None,
    batch_size: int | None = None,
    local_world_size: int | None = None,
) -> dict:
    """`dinrec plan`: the config planned offline for a topology; the plan document (see
    docs/plan-format.md), or a one-line ConfigError when the tables do not fit."""
    model, layout = model_on_meta(cfg)
    batch = batch_size or cfg.data.batch_size
    dense = dense_memory(cfg, batch)
    plan, best, topology = plan_offline(
        model,
        sharders_for(cfg.sparse_optimizer),
        layout,
        world_size,
        compute_device,
        batch,
        row_bytes=extra_row_bytes(cfg.sparse_optimizer),
        dense_bytes=sum(dense.values()),
        hbm=hbm,
        ddr=ddr,
        local_world_size=local_world_size,
    )
    return plan_document(cfg, plan, best, topology, batch, dense)

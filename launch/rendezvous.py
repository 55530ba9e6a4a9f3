"""Ray Train's process group, with its rendezvous store listening on rank 0's address only.

torch's TCPStore server takes no address to bind: it listens on every interface. The process
group Ray Train's `TorchConfig` sets up (MASTER_ADDR/MASTER_PORT, `env://`) therefore opens an
unauthenticated server to the network, even for a run on one machine. `torch_config` here does
the same setup, except that rank 0's process binds the store's socket itself, on its Ray node's
address (127.0.0.1 under a local Ray, the address the node was started with on a cluster), and
hands it to the TCPStore (`master_listen_fd`: `trainer.sharding.store_on`). Every rank, rank 0
included, joins as a client. Each start of the worker group (a restart after a failure included)
makes a new store, as Ray's setup does.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from trainer.sharding import store_on

_SERVER: dist.TCPStore | None = None  # rank 0's store; lives as long as rank 0's process


def serve(world_size: int, timeout_s: int) -> tuple[str, int]:
    """Rank 0: a TCPStore server on this Ray node's address only; its (address, port)."""
    import ray

    global _SERVER
    addr = ray.util.get_node_ip_address()
    _SERVER = store_on(addr, 0, world_size, server=True, timeout=timeout_s)
    return addr, _SERVER.port


def join(backend: str, addr: str, port: int, rank: int, world_size: int, timeout_s: int) -> None:
    """Every rank: the process group, through a client of rank 0's store."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    if backend == "nccl" and not {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT"} & os.environ.keys():
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # as Ray's setup: fail on an NCCL timeout
    store = store_on(addr, port, world_size, server=False, timeout=timeout_s)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def torch_config(backend: str):
    """Ray Train's `TorchConfig(backend=backend)`, its process group set up by `serve` and `join`.
    (Ray is imported here, not with the module: the torchrun path never loads it.)"""
    import ray
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
    from ray.train.torch import config as ray_torch

    class Backend(ray_torch._TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            world = len(worker_group)
            addr, port = worker_group.execute_single(0, serve, world, backend_config.timeout_s)
            if not isinstance(worker_group, V1WorkerGroup):  # as Ray's: LOCAL_RANK, RANK, ... before the group
                worker_group.execute(ray_torch._set_torch_distributed_env_vars)
            args = (backend_config.backend, addr, port)
            timeout = backend_config.timeout_s
            ray.get([worker_group.execute_single_async(i, join, *args, i, world, timeout) for i in range(world)])

    class TorchConfig(ray_torch.TorchConfig):
        @property
        def backend_cls(self):
            return Backend

    return TorchConfig(backend=backend)

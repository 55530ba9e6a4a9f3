"""Run the worker function under Ray Train (`TorchTrainer`): on a local Ray started here (bound to
127.0.0.1, no dashboard) or on an existing cluster (`ray job submit`, see launch/ray_job.py).

Rank 0 reports the final metrics with a small checkpoint (result.json), which is how they reach
the driver. With `launch.max_failures` = N, Ray Train restarts the worker group up to N times after
a worker dies; the restarted workers continue from the newest checkpoint this run wrote (the run
id passed to every worker tags them, see trainer.resume). A failure beyond that ends
the run with one line naming the rank and the cause.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

from launch.process import quiet_libraries
from trainer.config import Config, ConfigError, config_from_dict
from trainer.data import DataError
from trainer.loop import NonFiniteLoss, train
from trainer.sharding import backend


class WorkerFailed(RuntimeError):
    """A Ray Train worker died or raised: `rank` and a one-line `cause`."""

    def __init__(self, rank: int, cause: str, user_error: bool):
        super().__init__(f"worker rank {rank} failed: {cause}")
        self.rank, self.cause, self.user_error = rank, cause, user_error


def train_fn(config: dict) -> None:  # a required parameter: Ray Train V2 drops config otherwise
    import ray.train

    quiet_libraries()
    cfg = config_from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    try:
        result = train(cfg, progress=config.get("progress", True) and rank == 0, run_id=config["run_id"])
    except NonFiniteLoss as e:  # every rank stops at the same step: an answer, not a failure to retry
        result = {"error": str(e)}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            Path(d, "result.json").write_text(json.dumps(result))
            ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({"done": 1})


def run(cfg: Config, address: str | None, progress: bool = True) -> dict:
    """Train `cfg` with cfg.launch.workers Ray Train workers; return rank 0's final metrics."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {"GLOO_SOCKET_IFNAME": "lo"} if address is None else {}
    if address is None:  # local workers need not share the driver's working directory
        cfg = _absolute_paths(cfg)
    started = False
    if not ray.is_initialized():
        if address is None:
            start_local_ray(max(cfg.launch.workers, os.cpu_count() or 1), env)
        else:
            ray.init(address=address)
        started = True
    try:
        storage = Path(cfg.train.out_dir).resolve() / "ray"
        trainer = TorchTrainer(
            train_fn,
            train_loop_config={"cfg": cfg.to_dict(), "progress": progress, "run_id": uuid.uuid4().hex},
            scaling_config=ScalingConfig(
                num_workers=cfg.launch.workers,
                use_gpu=cfg.launch.use_gpu,
                resources_per_worker=None if cfg.launch.use_gpu else {"CPU": 1},
            ),
            torch_config=TorchConfig(backend=backend(cfg)),
            run_config=RunConfig(
                storage_path=str(storage),
                name="train",
                failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - turned into one line below
            raise _worker_failure(e) from None
        with result.checkpoint.as_directory() as d:
            out = json.loads(Path(d, "result.json").read_text())
        if "error" in out:
            raise NonFiniteLoss(out["error"])
        return out
    finally:
        if started:
            ray.shutdown()


def start_local_ray(num_cpus: int, env: dict[str, str]) -> None:
    """A local Ray whose every server listens on 127.0.0.1 only, without a dashboard.

    `_node_ip_address` alone is not enough: Ray then still advertises the machine's outward
    address and its gRPC servers listen on all interfaces. Turning off Ray's "cluster" mode
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by the driver and by the processes it starts)
    keeps them all on loopback.
    """
    import ray
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; ray may be imported already
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=True,
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        configure_logging=False,
    )


def _absolute_paths(cfg: Config) -> Config:
    def absolute(p: str) -> str:
        return p if os.path.isabs(p) else os.path.abspath(p)

    data = replace(cfg.data, train=absolute(cfg.data.train), test=absolute(cfg.data.test))
    return replace(cfg, data=data, train=replace(cfg.train, out_dir=absolute(cfg.train.out_dir)))


def _worker_failure(e: Exception) -> Exception:
    failures = getattr(e, "worker_failures", None) or {}
    if not failures:
        return WorkerFailed(-1, _one_line(e), user_error=False)
    rank = min(failures)
    cause = failures[rank]
    inner = getattr(cause, "cause", None) or cause  # a RayTaskError wraps the worker's exception
    user_error = isinstance(inner, (ConfigError, DataError))
    text = str(inner) if user_error else f"{type(inner).__name__}: {_one_line(inner)}"
    return WorkerFailed(rank, text, user_error)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__

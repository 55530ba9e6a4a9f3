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
import sys
import tempfile
import threading
import traceback
import uuid
from dataclasses import replace
from pathlib import Path

from launch.process import quiet_libraries
from launch.rendezvous import torch_config
from trainer import checkpoint, storage
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
    if config.get("threads"):  # a CPU worker computes with the cores Ray gave it
        import torch

        torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    os.environ["DINREC_NODE"] = ray.get_runtime_context().get_node_id()  # for the segment record
    try:  # the driver draws the progress bar (Progress): the workers' output is not forwarded
        result = train(cfg, progress=False, run_id=config["run_id"])
    except NonFiniteLoss as e:  # every rank stops at the same step: an answer, not a failure to retry
        result = {"error": str(e)}
    except BaseException:
        storage.write_text(worker_log(cfg.train.out_dir, rank), traceback.format_exc())
        raise
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            Path(d, "result.json").write_text(json.dumps(result))
            ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({"done": 1})


def worker_log(out_dir: str, rank: int) -> str:
    """Where a worker that failed leaves its traceback."""
    return storage.join(out_dir, "logs", f"worker-{rank}.log")


def run(cfg: Config, address: str | None, progress: bool = True) -> dict:
    """Train `cfg` with cfg.launch.workers Ray Train workers; return rank 0's final metrics.

    The workers' own output is not forwarded to this process (Ray's `log_to_driver` is off): a
    failing worker's traceback goes to out_dir/logs/worker-<rank>.log, named in the one line
    that reports the failure, and the progress bar is drawn here from out_dir/metrics.jsonl."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    env = {"GLOO_SOCKET_IFNAME": "lo"} if address is None else {}
    if address is None:  # local workers need not share the driver's working directory
        cfg = _absolute_paths(cfg)
    started = False
    cpus = cpus_per_worker(cfg, address)
    if not ray.is_initialized():
        if address is None:
            start_local_ray(max(cfg.launch.workers * cpus, os.cpu_count() or 1), env)
        else:
            ray.init(address=address, log_to_driver=False)
        started = True
    follower = Progress(storage.join(cfg.train.out_dir, "metrics.jsonl"), bars=progress)
    try:
        trainer = TorchTrainer(
            train_fn,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "progress": progress,
                "run_id": uuid.uuid4().hex,
                "threads": None if cfg.launch.use_gpu else cpus,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.launch.workers,
                use_gpu=cfg.launch.use_gpu,
                resources_per_worker=None if cfg.launch.use_gpu else {"CPU": cpus},
            ),
            torch_config=torch_config(backend(cfg)),  # its store on rank 0's address only
            run_config=RunConfig(
                storage_path=storage.join(storage.absolute(cfg.train.out_dir), "ray"),
                name="train",
                failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - turned into one line below
            raise _worker_failure(e, cfg.train.out_dir) from None
        finally:
            follower.close()
        with result.checkpoint.as_directory() as d:
            out = json.loads(Path(d, "result.json").read_text())
        if "error" in out:
            raise NonFiniteLoss(out["error"])
        return out
    finally:
        if started:
            ray.shutdown()


def cpus_per_worker(cfg: Config, address: str | None) -> int:
    """The cores (and torch threads) of each CPU worker: `launch.cpus_per_worker`, or with 0 the
    machine's cores divided among the workers of a local Ray (at least 1), 1 on a cluster."""
    if cfg.launch.cpus_per_worker:
        return cfg.launch.cpus_per_worker
    if address is not None:
        return 1
    return max(1, len(os.sched_getaffinity(0)) // cfg.launch.workers)


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
        log_to_driver=False,
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        configure_logging=False,
    )


def _absolute_paths(cfg: Config) -> Config:
    data = replace(cfg.data, train=storage.absolute(cfg.data.train), test=storage.absolute(cfg.data.test))
    return replace(cfg, data=data, train=replace(cfg.train, out_dir=storage.absolute(cfg.train.out_dir)))


def _worker_failure(e: Exception, out_dir: str) -> Exception:
    failures = getattr(e, "worker_failures", None) or {}
    if not failures:
        return WorkerFailed(-1, _one_line(e), user_error=False)
    rank = min(failures)
    cause = failures[rank]
    inner = getattr(cause, "cause", None) or cause  # a RayTaskError wraps the worker's exception
    user_error = isinstance(inner, (ConfigError, DataError))
    text = str(inner) if user_error else f"{type(inner).__name__}: {_one_line(inner)}"
    log = worker_log(out_dir, rank)
    return WorkerFailed(rank, f"{text} (traceback: {log})" if _exists(log) else text, user_error)


def _exists(path: str) -> bool:
    try:
        return storage.is_file(path)
    except storage.StorageError:
        return False


class Progress:
    """What the terminal shows of a Ray run, drawn in the driver from the records rank 0 appends to
    metrics.jsonl: the damaged checkpoints a segment skipped (a segment record), and with `bars`
    the training progress bar (an `epoch_samples` record starts an epoch's bar, each loss record
    moves it)."""

    def __init__(self, path: str, bars: bool = True, poll: float = 0.5):
        from tqdm import tqdm

        self.tqdm, self.path, self.bars, self.poll = tqdm, path, bars, poll
        self.poll = max(poll, 2.0) if storage.is_uri(path) else poll  # an object store: a GET per poll
        self.offset = len(self._data(0))  # earlier segments' records
        self.bar, self.base = None, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True, name="dinrec-progress")
        self.thread.start()

    def _follow(self) -> None:
        while not self.stop.wait(self.poll):
            self._read()
        self._read()

    def _data(self, offset: int) -> bytes:
        try:
            return storage.read_from(self.path, offset)
        except storage.StorageError:  # not written yet, or the store did not answer this time
            return b""

    def _read(self) -> None:
        data = self._data(self.offset)
        lines = data.split(b"\n")[:-1]  # complete lines only
        self.offset += sum(len(line) + 1 for line in lines)
        for line in lines:
            try:
                self._show(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue

    def _show(self, r: dict) -> None:
        if "segment" in r:
            for s in r.get("skipped_checkpoints") or ():
                note = checkpoint.skipped_note(s["checkpoint"], s["why"], f"resuming from {r['resumed_from']}")
                self.tqdm.write(note, file=sys.stderr)
        elif not self.bars:
            return
        elif "epoch_samples" in r:
            self._close_bar(done=True)
            self.bar = self.tqdm(
                total=r["epoch_samples"],
                initial=r["first_samples"],
                desc=f"epoch {r['epoch']}",
                unit="samples",
                unit_scale=True,
                mininterval=1.0,
            )
            self.base = r["run_samples"] - r["first_samples"]
        elif "loss" in r and self.bar is not None:
            self.bar.n = r["samples"] - self.base
            self.bar.set_postfix(loss=f"{r['loss']:.4f}")
        elif "eval" in r and "steps" in r["eval"]:
            self._close_bar(done=True)

    def _close_bar(self, done: bool = False) -> None:
        """Close the bar; `done`: its epoch ended (the steps after the last loss record ran too)."""
        if self.bar is not None:
            if done:
                self.bar.n = self.bar.total
            self.bar.refresh()
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self._close_bar()


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__

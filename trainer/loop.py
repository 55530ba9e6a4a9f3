"""The worker function: build the sharded model, train it on the streamed Parquet data, evaluate,
checkpoint. Embedding tables go through DistributedModelParallel (FBGEMM fused kernels, the
sparse optimizer applied inside the backward pass); the dense tower is replicated under DDP with
the dense optimizer of the config. Only rank 0 logs and writes.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from embedding import mba_tbe
from embedding.counts import load_counts
from embedding.dense_memory import dense_memory
from embedding.plan import fingerprint as plan_fingerprint
from embedding.plan import load_plan, plan_inputs
from embedding.planner import plan_on_the_fly
from embedding.tables import FeatureLayout, init_rows
from trainer import checkpoint, faults, metrics
from trainer.config import Config, ConfigError
from trainer.data import ParquetStream, drop_ids, stream_from_config

DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def backend(cfg: Config) -> str:
    return "nccl" if cfg.launch.use_gpu else "gloo"


@contextmanager
def process_group(cfg: Config) -> Iterator[tuple[int, int]]:
    """The process group of this worker: the launcher's (Ray Train sets one up), one from
    torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or a 1-process group on
    loopback for a local run. Groups made here are destroyed on exit."""
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
        dist.init_process_group(backend(cfg), store=dist.PrefixStore(f"dinrec/attempt-{attempt}", store),
                                rank=rank, world_size=world)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a one-process group stays on loopback
        dist.init_process_group(backend(cfg), init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def build_model(cfg: Config, world_size: int, device: torch.device) -> DistributedModelParallel:
    """The config's model with its tables sharded by a plan; sparse optimizer fused in backward."""
    torch.manual_seed(cfg.train.seed)
    # Tables on meta (DMP allocates each rank's shards); the dense tower is built on the CPU.
    model, sharders, layout = plan_inputs(cfg)
    if cfg.train.plan:  # a plan file from `dinrec plan`, checked against this run
        plan = load_plan(cfg.train.plan, cfg, world_size, device.type)
    else:
        dense = dense_memory(cfg, cfg.data.batch_size)  # the same reservation as `dinrec plan`
        plan = plan_on_the_fly(model, layout, sharders, world_size, cfg.data.batch_size, device.type,
                               mba=cfg.sparse_optimizer.mba, dense_bytes=sum(dense.values()))
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    init_tables(dmp, layout, cfg.train.seed)
    if cfg.sparse_optimizer.mba and cfg.sparse_optimizer.counts == "static":
        load_static_counts(dmp, cfg)
    return dmp


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


def init_tables(model: nn.Module, layout: FeatureLayout, seed: int) -> None:
    """Give every local shard of every table its sharding-independent initial rows (see
    embedding.tables.init_rows), so that runs on any world size and plan start from the same
    weights."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    tables = {t.name: t for t in layout.seq_tables + layout.pooled_tables}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            name = key.rsplit(".", 2)[-2] if key.endswith(".weight") else None
            if name not in tables or not key.startswith("sparse."):
                continue
            if not isinstance(value, ShardedTensor):
                raise TypeError(f"{key}: expected a sharded table, got {type(value).__name__}")
            for shard in value.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(init_rows(tables[name], seed, r0, r0 + nr)[:, c0 : c0 + nc])


def dense_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    d = cfg.dense_optimizer
    return DENSE_OPTIMIZERS[d.type](params.values(), lr=d.lr, weight_decay=d.weight_decay)


def all_rows_decay(cfg: Config, model: nn.Module):
    """Plain L2 on every row (sparse_optimizer.l2_all), or None: scales every local shard by
    (1 − lr·l2_all). Run between the forward pass and the fused backward step, it makes the SGD
    step w − lr·(g + l2_all·w) exactly (the gradient was taken at the old weights); with row-wise
    Adagrad it is decoupled weight decay: (1 − lr·l2_all)·w − lr·g/(√s + ε), s unchanged by it."""
    sopt = cfg.sparse_optimizer
    if not sopt.l2_all:
        return None
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    shards = [shard.tensor for key, v in model.state_dict().items()
              if key.startswith("sparse.") and isinstance(v, ShardedTensor) for shard in v.local_shards()]
    factor = 1.0 - sopt.lr * sopt.l2_all

    def decay() -> None:
        # .data: FBGEMM's autograd node holds the weights only to update them in its backward, so
        # scaling them in between is the intended semantics, not a stale-gradient hazard
        for t in shards:
            t.data.mul_(factor)

    return decay


def worker_device(cfg: Config) -> torch.device:
    """cuda:LOCAL_RANK with launch.use_gpu (torchrun and Ray Train set LOCAL_RANK), else the CPU."""
    if not cfg.launch.use_gpu:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before that step's update."""


def run_identity(run_id: str | None) -> tuple[str, str | None]:
    """(the id this run's checkpoints are tagged with, the id whose checkpoints it continues).

    Ray: the driver's id for the whole run (a restarted worker group finds the checkpoints its
    predecessor wrote). torchrun: TORCHELASTIC_RUN_ID, continued only on a restart
    (TORCHELASTIC_RESTART_COUNT > 0). A local run: a fresh id, nothing continued.
    """
    if run_id is not None:
        return run_id, run_id
    if "TORCHELASTIC_RUN_ID" in os.environ:
        tag = os.environ["TORCHELASTIC_RUN_ID"]
        return tag, tag if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 else None
    return uuid.uuid4().hex, None


def resume_point(cfg: Config, continue_id: str | None) -> Path | None:
    """The checkpoint this run starts from: the newest of its own launcher run after a restart,
    else train.resume; None for a fresh run, which must not start over another run's checkpoints."""
    base = checkpoint.root(cfg.train.out_dir)
    if continue_id is not None:
        found = checkpoint.latest(base, continue_id)
        if found is not None:
            return found
    if cfg.train.resume:
        return checkpoint.resolve(cfg.train.resume, cfg.train.out_dir)
    existing = checkpoint.latest(base)
    if existing is not None:
        raise ConfigError(f"{cfg.train.out_dir}: holds the checkpoints of an earlier run (newest: {existing.name}); "
                          "continue it with --resume latest, or train into another train.out_dir")
    return None


def train(cfg: Config, progress: bool = True, run_id: str | None = None) -> dict:
    """Train `cfg` on this process group's ranks; returns the final metrics (on every rank).

    Checkpoints go to out_dir/checkpoints every train.checkpoint_every steps, at every epoch end
    and at the end; a run resumed from one (train.resume, or a launcher's restart, see
    `run_identity`) continues with the same batches in the same order and ends with the same
    weights as a run that was never interrupted.
    """
    device = worker_device(cfg)
    tag, continue_id = run_identity(run_id)
    with process_group(cfg) as (rank, world):
        out = Path(cfg.train.out_dir)
        start_from = resume_point(cfg, continue_id)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        model = build_model(cfg, world, device)
        opt = dense_optimizer(cfg, model)
        decay = all_rows_decay(cfg, model)
        # every feature of a behaviour, its DIEN negative included, so that dropout keeps them aligned
        dropout_keys = {k for k in FeatureLayout.from_config(cfg).keys if k.startswith(("hist_", "neg_hist_"))}
        generators = {"dropout": torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)}
        stream = stream_from_config(cfg, "train", rank, world)
        log = open(out / "metrics.jsonl", "a") if rank == 0 else None
        step, samples, epoch_evals, position = 0, 0, [], (0, 0)
        if start_from is not None:
            t_load = time.perf_counter()
            manifest = checkpoint.check_config(start_from, cfg)
            position = (manifest["position"]["epoch"], manifest["position"]["batches"])
            same_world = manifest["world_size"] == world
            if not same_world and position[1]:
                raise ConfigError(
                    f"{start_from}: written by {manifest['world_size']} rank(s) in the middle of epoch {position[0]} "
                    f"(after batch {position[1]}), it resumes on {manifest['world_size']} rank(s) only; a checkpoint "
                    f"at an epoch end resumes on any number")
            checkpoint.load(start_from, model, opt, generators if same_world else None)
            step, samples, epoch_evals = manifest["step"], manifest["samples"], manifest["epoch_evals"]
            if log:
                _log(log, step=step, resumed_from=str(start_from), load_seconds=round(time.perf_counter() - t_load, 3),
                     world_size=world)
        plan_fp = plan_fingerprint(cfg, world, device.type)

        def batches_in(epoch: int) -> int:
            n = stream.steps_for(epoch)
            return min(n, cfg.train.limit_batches) if cfg.train.limit_batches else n

        def save(epoch: int, done: int) -> Path:
            """Checkpoint the state after `done` batches of `epoch`."""
            if done >= batches_in(epoch):
                epoch, done = epoch + 1, 0
            at = {"epoch": epoch, "batches": done}
            meta = {"run_id": tag, "position": at, "samples": samples, "epoch_evals": epoch_evals,
                    "plan": {"file": cfg.train.plan, "fingerprint": plan_fp}}
            mine = stream.position(epoch, done) if epoch < cfg.train.epochs else {**at, "rank": rank}
            average_buffers(model, world)
            return checkpoint.save(out, step, model, cfg, meta, opt, generators, {**mine, "rank": rank},
                                   keep=cfg.train.keep_checkpoints)

        def guard(loss: torch.Tensor) -> torch.Tensor:
            """Stop before the update if any rank's loss is not finite (all ranks agree)."""
            loss = faults.poison(loss, rank, step + 1, out)
            ok = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
            if world > 1:
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if not ok.item():
                good = checkpoint.latest(checkpoint.root(out))
                raise NonFiniteLoss(f"non-finite training loss at step {step + 1} (epoch {epoch}, batch {i}): stopped "
                                    f"before its update; last good checkpoint: {good or 'none'}")
            return loss

        run_samples, t0 = 0, time.perf_counter()
        loss_sum, loss_n = 0.0, 0
        for epoch in range(position[0], cfg.train.epochs):
            model.train()
            first = position[1] if epoch == position[0] else 0
            n = batches_in(epoch)
            bar = tqdm(total=stream.steps_for(epoch) * cfg.data.batch_size * world, initial=first * cfg.data.batch_size * world,
                       unit="samples", unit_scale=True, desc=f"epoch {epoch}", disable=not progress or rank != 0,
                       mininterval=1.0)
            if log and world > 1 and first == 0:
                rows = stream.rows_per_rank(epoch)
                _log(log, epoch=epoch, rows_per_rank=rows, padding_rows=world * max(rows) - sum(rows))
            for i, batch in enumerate(stream.epoch(epoch, first), start=first):
                if i >= n:
                    break
                if cfg.model.id_dropout:
                    batch.sparse = drop_ids(batch.sparse, dropout_keys, cfg.model.id_dropout, generators["dropout"])
                loss = train_step(model, opt, batch.to(device), decay, guard)
                step += 1
                samples += len(batch) * world
                run_samples += len(batch) * world
                loss_sum += loss
                loss_n += 1
                bar.update(len(batch) * world)
                if step % cfg.train.log_every == 0:  # the same steps on every rank
                    mean = _mean_over_ranks(loss_sum / loss_n, world, device)
                    if log:
                        bar.set_postfix(loss=f"{mean:.4f}")
                        _log(log, step=step, epoch=epoch, samples=samples, loss=mean,
                             samples_per_s=run_samples / (time.perf_counter() - t0))
                    loss_sum, loss_n = 0.0, 0
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and i + 1 < n:
                    save(epoch, i + 1)  # the epoch's last batch: saved below, after the epoch's eval
                faults.point("kill", rank, step, out)
            bar.close()
            if cfg.train.eval_every_epoch and epoch < cfg.train.epochs - 1:
                average_buffers(model, world)
                r = evaluate(model, stream_from_config(cfg, "test", rank, world), False, device)
                epoch_evals.append({"epoch": epoch, **r})
                if log:
                    _log(log, step=step, epoch=epoch, eval=r)
            if epoch < cfg.train.epochs - 1:
                save(epoch, n)
        train_seconds = time.perf_counter() - t0
        average_buffers(model, world)
        result = evaluate(model, stream_from_config(cfg, "test", rank, world), progress and rank == 0, device)
        if cfg.train.eval_every_epoch:
            result["epochs"] = [*epoch_evals, {"epoch": cfg.train.epochs - 1, **result}]
        result.update(
            model=cfg.model.name,
            steps=step,
            train_samples=samples,
            train_seconds=round(train_seconds, 2),
            train_samples_per_s=round(run_samples / train_seconds, 1) if run_samples else None,
        )
        if device.type == "cuda":  # against the planner's HBM estimate (`dinrec plan`)
            result["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        result["checkpoint"] = str(save(cfg.train.epochs - 1, batches_in(cfg.train.epochs - 1)))
        if log:
            _log(log, step=step, eval=result)
            log.close()
        return result


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
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    state = model.state_dict()
    for name, buf in model.named_buffers():
        if name in state and buf.is_floating_point() and not isinstance(state[name], ShardedTensor):
            dist.all_reduce(buf)
            buf.div_(world)


def _mean_over_ranks(value: float, world: int, device: torch.device) -> float:
    """The global-batch mean of a per-rank mean (equal local batch sizes)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world


def training_loss(model: nn.Module, batch) -> torch.Tensor:
    """The loss to minimise on a batch: the click log loss, plus the model's own training term
    when its forward returns (logits, term) (DIEN: L = L_target + α·L_aux, Eq. 7)."""
    out = model(batch)
    logits, extra = out if isinstance(out, tuple) else (out, None)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
    return loss if extra is None else loss + extra


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch, before_backward=None, check=None) -> float:
    """One step on this rank's part of the global batch; returns the local mean loss. `check`
    sees the loss before the backward pass and returns the loss to use (or raises).

    Each rank's loss is the mean over its local rows; DDP averages dense gradients over ranks and
    torchrec's collectives divide embedding gradients by the world size, so with equal local
    batch sizes (see ParquetStream.epoch) every update uses the global-batch mean gradient.
    """
    loss = training_loss(model, batch)
    if check is not None:
        loss = check(loss)
    if before_backward is not None:
        before_backward()
    opt.zero_grad(set_to_none=True)
    loss.backward()  # the fused sparse optimizer updates the tables here
    opt.step()
    return loss.item()


def _log(f, **record) -> None:
    f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
    f.flush()


@torch.no_grad()
def evaluate(model: nn.Module, stream: ParquetStream, progress: bool = False,
             device: torch.device | None = None) -> dict:
    """Exact AUC, GAUC (Eq. 10) and logloss over every rank's share of the eval set."""
    model.eval()
    device = device or torch.device("cpu")
    probs, labels, users, oracle = [], [], [], []
    bar = tqdm(total=stream.rows_for(0), unit="samples", unit_scale=True, desc="eval",
               disable=not progress, mininterval=1.0)
    for batch in stream.epoch(0):
        probs.append(torch.sigmoid(model(batch.to(device))).cpu().numpy())
        labels.append(batch.labels.numpy())
        users.append(batch.users.numpy())
        if batch.p_click is not None:
            oracle.append(batch.p_click.numpy())
        bar.update(len(batch))
    bar.close()
    own = stream.rows_for(0)  # rows after these are padding (repeats), see ParquetStream.epoch
    local = [np.concatenate(x)[:own] if x else np.zeros(0) for x in (probs, labels, users, oracle)]
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
        path = checkpoint.resolve(path)
        meta = checkpoint.load(path, model)
        result = evaluate(model, stream_from_config(cfg, "test", rank, world), progress and rank == 0, device)
        result.update(model=cfg.model.name, checkpoint=str(path), step=meta.get("step"))
        return result


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a whole tensor on rank 0 (sharded tables gathered); a
    collective: all ranks call it, other ranks get {}."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            value = full
        elif hasattr(value, "full_tensor"):  # DTensor
            value = value.full_tensor()
        if rank == 0:
            out[key] = value.detach().clone()
    return out

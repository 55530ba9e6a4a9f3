"""The worker function of every launcher: train the config on this process group's ranks,
evaluate, checkpoint. Only rank 0 logs and writes.

    train()
      resume          the checkpoint to start from (trainer.resume), loaded into model and optimizers
      for each epoch
        run_epoch     batches of this rank's share -> step -> log every train.log_every steps,
                      checkpoint every train.checkpoint_every steps
        evaluate      the validation set (data.valid) and (train.eval_every_epoch) the test set
        save          a checkpoint at the epoch end; the best epoch by validation GAUC so far
                      once more under out_dir/best
      evaluate        the test set (and the validation set), then the final checkpoint

The model, its sharding and the optimizers come from trainer.sharding; the steps are
trainer.step.Steps (torchrec's TrainPipelineSparseDist) over the batches of `epoch_batches`.

Nothing in the steady state waits for the device: each step's loss stays on it, summed there, and
is read at log steps (every train.log_every steps), together with the non-finite-loss guard's
flags (see `verify_finite`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import resource
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from embedding.layout import FeatureLayout
from embedding.plan import fingerprint as plan_fingerprint
from trainer import checkpoint, faults, storage
from trainer.batch import Batch, drop_ids
from trainer.config import Config, ConfigError
from trainer.data import ParquetStream, stream_from_config
from trainer.evaluate import average_buffers, evaluate
from trainer.models.layers import resolved_precision
from trainer.resume import resume_point, run_identity, segments
from trainer.sharding import AllRowsDecay, all_rows_decay, build_model, dense_optimizer, process_group, worker_device
from trainer.step import Steps


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stopped at the next check, before any
    checkpoint held an update from it."""


@dataclass
class Position:
    """Where the run is; what a checkpoint records and a resumed run restores."""

    epoch: int = 0
    batch: int = 0  # batches of the current segment of `epoch` done
    earlier: list = field(default_factory=list)  # [world size, batches] of the epoch's earlier segments
    step: int = 0  # optimizer steps of the whole run
    samples: int = 0  # global training samples of the whole run
    epoch_evals: list = field(default_factory=list)


@dataclass
class Speed:
    """Samples trained by this process since it started, and the loss since the last log line."""

    t0: float = field(default_factory=time.perf_counter)
    samples: int = 0
    loss_sum: torch.Tensor | float = 0.0  # on the device: read at log steps only
    loss_n: int = 0


@dataclass
class Run:
    """What every named step of `train` works on."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    out: str  # train.out_dir: a local path or a URI (trainer.storage)
    tag: str  # the run id its checkpoints carry
    model: nn.Module
    opt: torch.optim.Optimizer
    decay: AllRowsDecay | None
    stream: ParquetStream
    test: ParquetStream
    valid: ParquetStream | None  # data.valid
    progress: bool
    plan_fingerprint: str
    dropout_keys: set[str]
    steps: Steps | None = None  # the pipeline (made once the run's position is known)
    # each step's loss since the last check: (step, epoch, batch, non-finite flag on the device)
    unchecked: list = field(default_factory=list)
    log: storage.AppendLog | None = None  # metrics.jsonl, rank 0 only
    startup_seconds: float = 0.0
    base_rss: int = 0
    speed: Speed = field(default_factory=Speed)

    def batches_in(self, epoch: int, earlier: list) -> int:
        """Batches of the segment of `epoch` after `earlier` (train.limit_batches caps them)."""
        n = self.stream.steps_for(epoch, earlier)
        return min(n, self.cfg.train.limit_batches) if self.cfg.train.limit_batches else n


def train(cfg: Config, progress: bool = True, run_id: str | None = None) -> dict:
    """Train `cfg` on this process group's ranks; returns the final metrics (on every rank).

    Checkpoints go to out_dir/checkpoints every train.checkpoint_every steps, at every epoch end
    and at the end; a run resumed from one (train.resume, or a launcher's restart, see
    trainer.resume) continues with the same batches in the same order and ends with the same
    weights as a run that was never interrupted.
    """
    t_start = time.perf_counter()
    base_rss = _max_rss()  # the process before the model: interpreter, torch, torchrec, Ray
    device = worker_device(cfg)
    tag, continue_id = run_identity(run_id)
    with process_group(cfg) as (rank, world):
        start_from = resume_point(cfg, continue_id)  # may refuse the out_dir
        run = setup(cfg, rank, world, device, tag, progress)  # checks the model, the plan and the data
        at, loaded = resume(run, start_from) if start_from is not None else (Position(), {})  # may refuse it
        if rank == 0:  # accepted: from here on the run directory describes this run
            storage.make_dirs(run.out)
        metrics = storage.join(run.out, "metrics.jsonl")
        with storage.AppendLog(metrics) if rank == 0 else contextlib.nullcontext() as log:
            run.log = log
            start_segment(run, at, start_from, {**loaded, "nodes": nodes(world)})
            run.steps = Steps(run.model, run.opt, device, run.decay, functools.partial(record_loss, run, at))
            run.speed = Speed()  # the run's speed counts from here
            run.startup_seconds = round(run.speed.t0 - t_start, 2)  # group, model, tables, resume
            run.base_rss = base_rss
            last = cfg.train.epochs - 1
            try:
                for epoch in range(at.epoch, cfg.train.epochs):
                    run_epoch(run, at, epoch)
                    if epoch < last and (cfg.train.eval_every_epoch or run.valid is not None):
                        evaluate_epoch(run, at, epoch)
                    if epoch < last:
                        save_epoch(run, at)
                return finish(run, at)
            finally:
                run.stream.close()  # the loader workers (data.loader_workers)


def setup(cfg: Config, rank: int, world: int, device: torch.device, tag: str, progress: bool) -> Run:
    """The sharded model, its optimizers, this rank's training and test streams. The data is
    checked here, before the first step: every file of both sets opens, has the schema, and each
    rank has rows to read."""
    stream, test = stream_from_config(cfg, "train", rank, world), stream_from_config(cfg, "test", rank, world)
    stream.check_rows("data.train")
    test.check_rows("data.test")
    valid = stream_from_config(cfg, "valid", rank, world) if cfg.data.valid else None
    if valid is not None:
        valid.check_rows("data.valid")
    model = build_model(cfg, world, device)
    return Run(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        out=cfg.train.out_dir,
        tag=tag,
        model=model,
        opt=dense_optimizer(cfg, model),
        decay=all_rows_decay(cfg, model),
        stream=stream,
        test=test,
        valid=valid,
        progress=progress,
        plan_fingerprint=plan_fingerprint(cfg, world, device.type),
        dropout_keys=set(FeatureLayout.from_config(cfg).behaviour_keys),
    )


def log_record(run: Run, **record) -> None:
    if run.log:
        run.log.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def resume(run: Run, found: checkpoint.Found) -> tuple[Position, dict]:
    """Load the checkpoint into the model and the optimizers: where it left off, and what the
    segment record says of the load.

    On the world size that wrote it, the run continues its segment batch for batch. On another,
    a checkpoint from the middle of an epoch starts a new segment: the rows of the epoch not yet
    trained (the data position is global, see trainer.data.Segment) are split over the new ranks,
    and the global batch becomes the new world size × data.batch_size (said in the log)."""
    t_load = time.perf_counter()
    path = found.path
    manifest = checkpoint.check_config(path, run.cfg)
    pos = manifest["position"]
    epoch, batches, earlier = pos["epoch"], pos["batches"], [list(e) for e in pos.get("earlier", [])]
    wrote = manifest["world_size"]
    same_world = wrote == run.world
    loaded: dict = {}
    if not same_world and batches:
        earlier, batches = [*earlier, [wrote, batches]], 0
        left = sum(run.stream.segment(epoch, earlier).rows)
        if left < run.world:
            raise ConfigError(
                f"{path}: {left} row(s) of epoch {epoch} are left to train, fewer than the {run.world} ranks "
                f"of this run: resume on at most {left}"
            )
        loaded["resplit"] = {
            "epoch": epoch,
            "from_world_size": wrote,
            "world_size": run.world,
            "rows_left": left,
            "global_batch": run.world * run.cfg.data.batch_size,
        }
    checkpoint.load(path, run.model, run.opt, {} if same_world else None, verified=True)
    # Adam's bias corrections count the updates so far: one per training step
    fused = getattr(run.model, "fused_optimizer", None)
    if hasattr(fused, "set_optimizer_step"):
        fused.set_optimizer_step(manifest["step"])
    loaded["load_seconds"] = round(time.perf_counter() - t_load, 3)
    at = Position(epoch, batches, earlier, manifest["step"], manifest["samples"], manifest["epoch_evals"])
    return at, loaded


def nodes(world: int) -> list[str]:
    """Every rank's machine: the launcher's node id (DINREC_NODE, set by the Ray launcher) or the
    host name (a collective)."""
    return every_rank(os.environ.get("DINREC_NODE") or socket.gethostname(), world)


def start_segment(run: Run, at: Position, found: checkpoint.Found | None, loaded: dict) -> None:
    """Rank 0 writes the run's config.yaml and, in metrics.jsonl, where this segment of the run
    starts: its config (the history of a resumed run's configs), the world size, the checkpoint it
    resumed from and the damaged ones it skipped (also said on stderr)."""
    if run.rank != 0:
        return
    storage.write_text(storage.join(run.out, "config.yaml"), yaml.safe_dump(run.cfg.to_dict(), sort_keys=False))
    skipped = [{"checkpoint": str(p), "why": why} for p, why in (found.skipped if found else ())]
    for s in skipped:
        print(
            checkpoint.skipped_note(s["checkpoint"], s["why"], f"resuming from {found.path}"),
            file=sys.stderr,
            flush=True,
        )
    if "resplit" in loaded:
        print(resplit_note(loaded["resplit"]), file=sys.stderr, flush=True)
    log_record(
        run,
        segment=len(segments(run.out)) + 1,
        run_id=run.tag,
        step=at.step,
        config_fingerprint=checkpoint.config_fingerprint(run.cfg),
        world_size=run.world,
        resumed_from=str(found.path) if found else None,
        verify_seconds=found.verify_seconds if found else None,
        skipped_checkpoints=skipped,
        **loaded,
        config=run.cfg.to_dict(),
    )


def resplit_note(r: dict) -> str:
    """The line that says a mid-epoch checkpoint resumes on another world size."""
    return (
        f"dinrec: resuming epoch {r['epoch']} of a {r['from_world_size']}-rank checkpoint on {r['world_size']} "
        f"rank(s): its {r['rows_left']} rows not yet trained are split over them; the global batch is now "
        f"{r['global_batch']} rows"
    )


def run_epoch(run: Run, at: Position, epoch: int) -> None:
    """Train `epoch` from batch `at.batch` of its current segment (0 unless resumed into it); at
    the end `at` points at the segment's last batch done."""
    cfg = run.cfg
    if at.epoch != epoch:
        at.batch, at.earlier = 0, []
    at.epoch, first = epoch, at.batch
    seg = run.stream.segment(epoch, at.earlier)
    n = run.batches_in(epoch, at.earlier)
    before = run.stream.num_rows - sum(seg.rows)  # trained by the epoch's earlier segments
    run.model.train()
    log_record(
        run,
        epoch=epoch,
        epoch_samples=before + seg.rows_through(n),
        first_samples=before + seg.rows_through(first),
        run_samples=at.samples,
        rows_per_rank=list(seg.rows),
        earlier_segments=at.earlier,
    )
    with tqdm(
        total=before + seg.rows_through(n),
        initial=before + seg.rows_through(first),
        unit="samples",
        unit_scale=True,
        desc=f"epoch {epoch}",
        disable=not run.progress or run.rank != 0,
        mininterval=1.0,
    ) as bar:
        for loss in run.steps.run(epoch_batches(run, at, first, n)):
            rows = seg.global_rows(at.batch)
            at.step += 1
            at.batch += 1
            at.samples += rows
            run.speed.samples += rows
            run.speed.loss_sum += loss
            run.speed.loss_n += 1
            bar.update(rows)
            if at.step % cfg.train.log_every == 0:  # the same steps on every rank
                log_loss(run, at, bar)
            if cfg.train.checkpoint_every and at.step % cfg.train.checkpoint_every == 0 and at.batch < n:
                save(run, at)  # the epoch's last batch: saved after the epoch (and its eval)
            faults.step_end(run.rank, at.step, run.out)
    verify_finite(run, at)


def epoch_batches(run: Run, at: Position, first: int, n: int) -> Iterator[Batch]:
    """This rank's batches `first` .. `n` − 1 of the current segment of `at.epoch`, ready for the
    step: id dropout applied. The pipeline moves them to the device. Id dropout draws from a
    generator seeded by the batch's place (seed, rank, epoch, segment, batch), so that a resumed
    run draws what the uninterrupted one drew, however far ahead the pipeline reads."""
    batches = itertools.islice(run.stream.epoch(at.epoch, first, at.earlier), n - first)
    for k, batch in enumerate(batches, start=first):
        if run.cfg.model.id_dropout:
            g = torch.Generator().manual_seed(dropout_seed(run.cfg.train.seed, run.rank, at.epoch, len(at.earlier), k))
            batch.sparse = drop_ids(batch.sparse, run.dropout_keys, run.cfg.model.id_dropout, g)
            if batch.pooled is not None:  # the behaviours are pooled features with history_pooled (BaseModel)
                batch.pooled = drop_ids(batch.pooled, run.dropout_keys, run.cfg.model.id_dropout, g)
        yield batch


def dropout_seed(*place: int) -> int:
    return int(np.random.SeedSequence(list(place)).generate_state(1, np.uint64)[0] >> 1)


def record_loss(run: Run, at: Position, loss: torch.Tensor) -> torch.Tensor:
    """The step's loss, its non-finiteness noted on the device for the next `verify_finite`
    (runs inside the step's forward: at.step is the steps before it)."""
    loss = faults.poison(loss, run.rank, at.step + 1, run.out)
    run.unchecked.append((at.step + 1, at.epoch, at.batch, ~torch.isfinite(loss.detach())))
    return loss


def verify_finite(run: Run, at: Position) -> None:
    """The non-finite-loss guard: whether any rank's loss since the last check was NaN or
    infinite (one read of the device, a collective); if so, stop naming the first such step.

    It runs at every log step, before every checkpoint and evaluation and at each epoch end, so
    the updates of a non-finite loss live at most train.log_every − 1 further steps, in this
    process only: no checkpoint is written after one, and a resumed run starts from the last
    checkpoint, written before it (the bound of the check, see docs/checkpoints.md)."""
    if not run.unchecked:
        return
    steps, flags = run.unchecked, torch.stack([f for *_, f in run.unchecked]).to(torch.float32)
    run.unchecked = []
    if run.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad = flags.tolist()
    if any(bad):
        step, epoch, batch, _ = steps[bad.index(1.0)]
        good = checkpoint.latest(checkpoint.root(run.out))
        raise NonFiniteLoss(
            f"non-finite training loss at step {step} (epoch {epoch}, batch {batch}), found at step {at.step}: "
            f"stopped; no checkpoint holds its update; last good checkpoint: {good or 'none'}"
        )


def log_loss(run: Run, at: Position, bar: tqdm) -> None:
    """The mean loss over ranks since the last log line, to metrics.jsonl and the progress bar
    (the one read of the device per train.log_every steps, with the guard's)."""
    verify_finite(run, at)
    mean = mean_over_ranks(run.speed.loss_sum / run.speed.loss_n, run.world)
    if run.log:
        bar.set_postfix(loss=f"{mean:.4f}")
        log_record(
            run,
            step=at.step,
            epoch=at.epoch,
            samples=at.samples,
            loss=mean,
            samples_per_s=run.speed.samples / (time.perf_counter() - run.speed.t0),
        )
    run.speed.loss_sum, run.speed.loss_n = 0.0, 0


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    """The global-batch mean of per-rank (scaled, see trainer.step) mean losses."""
    t = value.detach().to(torch.float64).reshape(1)
    if world > 1:
        dist.all_reduce(t)
    return float(t) / world


def save(run: Run, at: Position, out: str | None = None, keep: int | None = None) -> str:
    """Checkpoint the state after `at.batch` batches of `at.epoch` (a collective), once the guard
    has seen every loss it holds; under `out` (default train.out_dir), keeping `keep` (default
    train.keep_checkpoints)."""
    verify_finite(run, at)
    epoch, done, earlier = at.epoch, at.batch, at.earlier
    if done >= run.batches_in(epoch, earlier):
        epoch, done, earlier = epoch + 1, 0, []
    where = {"epoch": epoch, "batches": done, "earlier": earlier}
    meta = {
        "run_id": run.tag,
        "position": where,
        "samples": at.samples,
        "epoch_evals": at.epoch_evals,
        "plan": {"file": run.cfg.train.plan, "fingerprint": run.plan_fingerprint},
    }
    mine = run.stream.position(epoch, done, earlier) if epoch < run.cfg.train.epochs else where
    average_buffers(run.model, run.world)
    path = checkpoint.save(
        run.out if out is None else out,
        at.step,
        run.model,
        run.cfg,
        meta,
        run.opt,
        {},
        {**mine, "rank": run.rank},
        keep=run.cfg.train.keep_checkpoints if keep is None else keep,
    )
    if run.log:  # on an object store: the log as far as the checkpoint
        run.log.sync()
    return path


def evaluate_epoch(run: Run, at: Position, epoch: int) -> None:
    """The metrics after `epoch` (test with train.eval_every_epoch, validation with data.valid),
    kept for the result and the checkpoints."""
    run.steps.detach()  # the model's own forward for evaluation; the next epoch's steps re-attach
    average_buffers(run.model, run.world)
    r = evaluate(run.model, run.test, False, run.device) if run.cfg.train.eval_every_epoch else {}
    if run.valid is not None:
        r["valid"] = evaluate(run.model, run.valid, False, run.device)
    at.epoch_evals.append({"epoch": epoch, **r})
    log_record(run, step=at.step, epoch=epoch, eval=r)


def best_entry(epoch_evals: list) -> int:
    """The index in epoch_evals of the best validation GAUC (the earliest of equals)."""
    gaucs = [e["valid"]["gauc"] for e in epoch_evals]
    return gaucs.index(max(gaucs))


def save_if_best(run: Run, at: Position) -> None:
    """When the epoch just evaluated has the best validation GAUC so far, its state once more
    under out_dir/best, which keeps that one only: `dinrec eval --checkpoint OUT/best` evaluates
    the epoch chosen on the validation set."""
    if best_entry(at.epoch_evals) == len(at.epoch_evals) - 1:
        save(run, at, storage.join(run.out, "best"), keep=1)


def save_epoch(run: Run, at: Position) -> str:
    """The epoch-end checkpoint (and the best one, with data.valid)."""
    path = save(run, at)
    if run.valid is not None:
        save_if_best(run, at)
    return path


def best_epoch(epoch_evals: list, best_dir: str) -> dict:
    """The epoch of the best validation GAUC (the earliest of equals), its validation metrics and,
    where the test set was evaluated after it, its test metrics; its checkpoint is under best_dir."""
    chosen = epoch_evals[best_entry(epoch_evals)]
    out = {"epoch": chosen["epoch"], "valid": chosen["valid"], "checkpoint_dir": best_dir}
    if "auc" in chosen:
        out["test"] = {k: v for k, v in chosen.items() if k not in ("epoch", "valid")}
    return out


def _max_rss() -> int:
    """This process's peak resident memory so far, in bytes (against `dinrec plan`'s DDR figure:
    the peak less the process before the model, `base_rss_bytes`)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def every_rank(value: int, world: int) -> list:
    """`value` of every rank, in rank order (a collective)."""
    if world == 1:
        return [value]
    every: list = [None] * world
    dist.all_gather_object(every, value)
    return every


def finish(run: Run, at: Position) -> dict:
    """The final checkpoint, then the final evaluation (a bad test row group found there cannot
    lose the training); the run's result."""
    cfg = run.cfg
    train_seconds = time.perf_counter() - run.speed.t0
    if at.epoch != cfg.train.epochs - 1:  # resumed from the final checkpoint
        at.epoch, at.earlier = cfg.train.epochs - 1, []
    at.batch = run.batches_in(at.epoch, at.earlier)
    final = save(run, at)
    run.steps.detach()
    average_buffers(run.model, run.world)
    result = evaluate(run.model, run.test, run.progress and run.rank == 0, run.device)
    last = cfg.train.epochs - 1
    if run.valid is not None:  # the last epoch's entry (the final checkpoint above is written without it)
        at.epoch_evals.append({"epoch": last, **result, "valid": evaluate(run.model, run.valid, False, run.device)})
        save_if_best(run, at)
        result["best"] = best_epoch(at.epoch_evals, storage.join(run.out, "best"))
        result["epochs"] = list(at.epoch_evals)
    elif cfg.train.eval_every_epoch:
        result["epochs"] = [*at.epoch_evals, {"epoch": last, **result}]
    trained = run.speed.samples
    result.update(
        model=cfg.model.name,
        precision=resolved_precision(cfg.model.precision, run.device),
        steps=at.step,
        train_samples=at.samples,
        train_seconds=round(train_seconds, 2),
        train_samples_per_s=round(trained / train_seconds, 1) if trained else None,
        startup_seconds=run.startup_seconds,
        peak_rss_bytes=every_rank(_max_rss(), run.world),
        base_rss_bytes=every_rank(run.base_rss, run.world),
        torch_threads=every_rank(torch.get_num_threads(), run.world),
    )
    if run.device.type == "cuda":  # against the planner's HBM estimate (`dinrec plan`)
        result["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(run.device)
    result["checkpoint"] = str(final)
    log_record(run, step=at.step, eval=result)
    return result

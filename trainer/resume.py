"""Which checkpoint a run starts from, which run it belongs to, and whether its run directory
may take it.

A run tags its checkpoints and its metrics.jsonl records with a run id. A launcher that restarts
its workers (Ray Train's `max_failures`, torchrun's `--max-restarts`) hands the restarted workers
the id of the run they continue, so they pick up that run's newest intact checkpoint;
`train.resume` (`--resume`) continues any run's; a fresh run refuses an out_dir that already
holds another run's checkpoints, metrics or config, so that a run directory only ever describes
one run. Damaged checkpoints (trainer.checkpoint.verify) are skipped for the newest intact one
when the run looks for "the newest"; a checkpoint named explicitly must verify.

Rank 0 decides (it reads and verifies the files once) and tells the other ranks.
"""

from __future__ import annotations

import json
import os
import uuid

from trainer import checkpoint, storage
from trainer.config import Config, ConfigError
from trainer.ranks import on_rank_zero

RUN_FILES = ("metrics.jsonl", "config.yaml")  # what a run writes into its out_dir besides checkpoints/


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


def resume_point(cfg: Config, continue_id: str | None) -> checkpoint.Found | None:
    """The checkpoint this run starts from (on every rank, decided by rank 0): the newest intact one
    of its own launcher run after a restart, else train.resume; None for a fresh run, which must
    not start over another run's files."""
    return on_rank_zero(lambda: _resume_point(cfg, continue_id))


def _resume_point(cfg: Config, continue_id: str | None) -> checkpoint.Found | None:
    base = checkpoint.root(cfg.train.out_dir)
    if continue_id is not None:
        found = checkpoint.newest_intact(base, continue_id)
        if found is not None:
            return found
    if cfg.train.resume:
        return checkpoint.find(cfg.train.resume, cfg.train.out_dir)
    existing = checkpoint.latest(base)
    if existing is not None and not (continue_id is not None and _all_of_run(base, continue_id)):
        raise ConfigError(
            f"{cfg.train.out_dir}: holds the checkpoints of an earlier run (newest: {storage.name(existing)}); "
            "continue it with --resume latest, or train into another train.out_dir"
        )
    out = cfg.train.out_dir
    earlier = [name for name in RUN_FILES if storage.exists(storage.join(out, name))]
    if earlier and not (continue_id is not None and run_ids(out) == {continue_id}):
        raise ConfigError(
            f"{out}: holds the {' and '.join(earlier)} of an earlier run (no checkpoint); train into another "
            "train.out_dir, or remove them"
        )
    return None


def _all_of_run(base: str, run_id: str) -> bool:
    """Whether every checkpoint under `base` is of launcher run `run_id` (a restart whose every
    checkpoint is damaged starts over, writing them anew)."""
    try:
        return all(checkpoint.read_manifest(p).get("run_id") == run_id for p in checkpoint.list_checkpoints(base))
    except ConfigError:
        return False


def segments(out: str) -> list[dict]:
    """The segment records of out/metrics.jsonl (where each run segment started), oldest first."""
    path = storage.join(str(out), "metrics.jsonl")
    if not storage.is_file(path):
        return []
    lines = storage.read_text(path).splitlines()
    found = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "segment" in record:
            found.append(record)
    return found


def run_ids(out: str) -> set[str]:
    """The run ids of the segments recorded in out/metrics.jsonl."""
    return {s.get("run_id") for s in segments(out)}

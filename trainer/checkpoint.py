"""Training checkpoints with torch.distributed.checkpoint (sharded, reshardable, resumable).

A run's checkpoints live in `<out_dir>/checkpoints/step-<step>/`, each one directory holding

- the DCP shards of the model (tables in whatever sharding they had, dense tower, Dice
  statistics), of the fused sparse optimizer's per-row state (row-wise Adagrad sums, MBA counts
  n_j: sharded like their tables), of the dense optimizer's state (replicated, written once), and
  of every rank's random generator states;
- `config.yaml`, the run's merged config;
- `manifest.json`, written last: the step, every rank's data position (epoch, batches done, and
  the file, row group and row offset the next batch starts at), the world size, the config and
  plan fingerprints, the run id of the launcher that wrote it, and the size and sha256 of every
  other file of the checkpoint.

Reading a checkpoint (`load`, `read_config`) first verifies every file against the manifest and
refuses a damaged one with one line naming the file and what is wrong; `find` (a run directory or
`latest`) skips damaged checkpoints for the newest intact one and says which it skipped.

`out_dir` is a local path or a URI (trainer.storage: `s3://…`, `gs://…`, …); the shards go
through DCP's file-system writer or its fsspec writer. Object stores have no rename, so one rule
makes a checkpoint atomic everywhere: the manifest is written last, after every other file, and
is the only proof that a checkpoint is complete. A `step-<step>` without one (a write that a crash
interrupted) is never read and is removed by the next save. The last `train.keep_checkpoints`
are kept. Rank 0 writes the manifest and prunes: on several machines `out_dir` must be storage
every node reaches (an object store, or a shared file system).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn

from trainer import faults, storage
from trainer.config import Config, ConfigError, config_from_dict
from trainer.ranks import on_rank_zero

FORMAT = 2  # 2: the manifest lists every file with its size and sha256
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step-(\d{9})$")
_PARTIAL = re.compile(r"^step-\d{9}(\.tmp)?$")  # `.tmp`: written by an older dinrec, which renamed

# Keys that do not change the weights a run produces (where it writes, how often it logs or saves,
# how it is launched, how many epochs it runs in all): a checkpoint resumes under other values.
_FREE = {
    "launch",
    "train.out_dir",
    "train.plan",
    "train.resume",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.epochs",
    "train.eval_every_epoch",
    "data.prefetch",
    "data.loader_workers",
}


def root(out_dir: str | Path) -> str:
    return storage.join(str(out_dir), "checkpoints")


_PATHS = {"data.train", "data.test"}  # compared as absolute paths


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key in _FREE:
            continue
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif key in _PATHS and isinstance(v, str):
            out[key] = storage.absolute(v)  # the Ray launcher makes them absolute, the others do not
        else:
            out[key] = v
    return out


def config_fingerprint(cfg: Config) -> str:
    """sha256 of the config keys that determine the weights (all but `_FREE`)."""
    return hashlib.sha256(json.dumps(_flat(cfg.to_dict()), sort_keys=True).encode()).hexdigest()[:16]


def check_config(path: str, cfg: Config) -> dict:
    """The checkpoint's manifest, if it was written under a config with the same weight-relevant
    keys as `cfg`; otherwise a one-line ConfigError naming the first keys that differ."""
    manifest = read_manifest(path)
    if manifest["config_fingerprint"] == config_fingerprint(cfg):
        return manifest
    saved, now = _flat(read_config(path).to_dict()), _flat(cfg.to_dict())
    diff = [k for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]
    if not diff:  # a fingerprint of the same keys taken before paths were compared as absolute
        return manifest
    shown = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in diff[:3])
    more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
    raise ConfigError(f"{path}: checkpoint of another config: {shown}{more}")


# -- finding checkpoints


def list_checkpoints(directory: str | Path) -> list[str]:
    """The complete checkpoints (manifest present) under a `checkpoints/` directory, oldest first
    (one listing of the directory, also on an object store)."""
    directory = str(directory)
    return [storage.join(directory, n) for n, complete in _step_dirs(directory).items() if complete and _NAME.match(n)]


def _partial(directory: str) -> list[str]:
    """The checkpoint directories under `directory` without a manifest: writes that did not finish."""
    return [
        storage.join(directory, n)
        for n, complete in _step_dirs(directory).items()
        if not complete and _PARTIAL.match(n)
    ]


def _step_dirs(directory: str) -> dict[str, bool]:
    """{name: has a manifest} of the directories directly under `directory`, sorted, from one
    recursive listing (also on an object store)."""
    found: dict[str, bool] = {}
    for f in storage.sizes(directory, recursive=True):
        if "/" in f:
            name = f.split("/")[0]
            found[name] = found.get(name, False) or f == f"{name}/{MANIFEST}"
    return dict(sorted(found.items()))


def latest(directory: str | Path, run_id: str | None = None) -> str | None:
    """The newest complete checkpoint under `directory` (of launcher run `run_id` if given)."""
    found = list_checkpoints(directory)
    if run_id is not None:
        found = [p for p in found if read_manifest(p).get("run_id") == run_id]
    return found[-1] if found else None


@dataclass(frozen=True)
class Found:
    """A checkpoint to read, verified, and the damaged newer ones skipped for it: (path, why)."""

    path: str | None
    skipped: tuple[tuple[str, str], ...] = ()
    verify_seconds: float = 0.0  # reading and hashing the files, the skipped ones included


def newest_intact(directory: str | Path, run_id: str | None = None) -> Found | None:
    """The newest checkpoint under `directory` (of launcher run `run_id` if given) that verifies,
    with the damaged newer ones it skipped; None if there is none."""
    found = _scan(directory, run_id)
    return found if found.path is not None else None


def _scan(directory: str | Path, run_id: str | None) -> Found:
    """newest_intact, and when there is none, a Found without a path that keeps the skipped list."""
    skipped, t0 = [], time.perf_counter()
    for path in reversed(list_checkpoints(directory)):
        try:
            manifest = verify(path)
        except ConfigError as e:
            skipped.append((path, str(e)))
            continue
        if run_id is None or manifest.get("run_id") == run_id:
            return Found(path, tuple(skipped), round(time.perf_counter() - t0, 4))
    return Found(None, tuple(skipped), round(time.perf_counter() - t0, 4))


def skipped_note(damaged: str | Path, why: str, then: str) -> str:
    """The line that says a damaged checkpoint was skipped, and what happens instead."""
    return f"dinrec: skipped the damaged checkpoint {damaged} ({why}); {then}"


def find(spec: str | Path, out_dir: str | Path | None = None) -> Found:
    """The checkpoint `spec` names, verified: 'latest' (of `out_dir`), a checkpoint, a run's
    `checkpoints/` directory or a run directory (their newest intact checkpoint)."""
    if str(spec) == "latest":
        if out_dir is None:
            raise ConfigError("--resume latest: no train.out_dir to look in")
        spec = out_dir
    path = str(spec).rstrip("/") or str(spec)
    if storage.is_file(storage.join(path, MANIFEST)):
        t0 = time.perf_counter()
        verify(path)
        return Found(path, (), round(time.perf_counter() - t0, 4))
    for directory in (path, root(path)):
        if list_checkpoints(directory):
            found = _scan(directory, None)
            if found.path is None:
                raise ConfigError(f"{directory}: no intact checkpoint (the newest: {found.skipped[0][1]})")
            return found
    if _PARTIAL.match(storage.name(path)) and storage.is_dir(path):
        raise ConfigError(f"{path}: incomplete checkpoint (no {MANIFEST}: its write did not finish)")
    raise ConfigError(f"{path}: no dinrec checkpoint there (nor under {root(path)})")


def resolve(spec: str | Path, out_dir: str | Path | None = None) -> str:
    """`find(spec, out_dir).path`."""
    return find(spec, out_dir).path


def read_manifest(path: str | Path) -> dict:
    file = storage.join(str(path), MANIFEST)
    try:
        manifest = json.loads(storage.read_text(file))
    except storage.StorageError:
        raise
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: unreadable checkpoint manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"{file}: damaged manifest (not a JSON object)")
    fmt = f"{file}: checkpoint format {manifest.get('format')!r}, this dinrec reads {FORMAT}"
    if "manifest_sha256" not in manifest and manifest.get("format") != FORMAT:
        raise ConfigError(f"{fmt} (an older dinrec wrote it)")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise ConfigError(f"{file}: damaged manifest (its content does not match its sha256)")
    if manifest.get("format") != FORMAT:
        raise ConfigError(fmt)
    return manifest


_VERIFIED: set[tuple[str, int]] = set()  # (checkpoint, its manifest's mtime) verified by this process


def verify(path: str | Path) -> dict:
    """The manifest of checkpoint `path`, once every file it lists has its size and sha256;
    otherwise a one-line ConfigError naming the file and what is wrong."""
    path = str(path)
    manifest = read_manifest(path)
    key = _verified_key(path)
    if key in _VERIFIED:
        return manifest
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ConfigError(f"{storage.join(path, MANIFEST)}: damaged manifest (no file list)")
    present = storage.sizes(path)
    for name, want in files.items():
        file = storage.join(path, name)
        if name not in present:
            raise ConfigError(f"{file}: missing (the checkpoint's manifest lists it)")
        size = present[name]
        if size != want["bytes"]:
            raise ConfigError(f"{file}: {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)")
        try:
            digest = storage.sha256(file)
        except storage.StorageError as e:
            raise ConfigError(f"{file}: unreadable ({str(e).removeprefix(file + ': ')})") from None
        if digest != want["sha256"]:
            raise ConfigError(f"{file}: its sha256 differs from the manifest's (damaged)")
    _VERIFIED.add(key)
    return manifest


def _verified_key(path: str) -> tuple[str, int]:
    return storage.absolute(path), storage.info(storage.join(path, MANIFEST)).mtime_ns


def _intact(path: str) -> bool:
    try:
        verify(path)
    except (ConfigError, OSError):
        return False
    return True


def _manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content without this digest (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_config(path: str | Path) -> Config:
    """The config a checkpoint (or a run directory's newest intact one) was written under."""
    path = resolve(path)
    return config_from_dict(yaml.safe_load(storage.read_text(storage.join(path, "config.yaml"))))


# -- state


def sparse_optimizer_state(model: nn.Module) -> dict:
    """The fused optimizer's tensor states, flat ("<param>/<state>" -> sharded tensor). They wrap
    the live buffers, so loading into them restores the optimizer in place."""
    fused = getattr(model, "fused_optimizer", None)
    if fused is None:
        return {}
    return {
        f"{param}/{name}": value
        for param, states in fused.state_dict()["state"].items()
        for name, value in states.items()
    }


def _dense_params(model: nn.Module) -> list[str]:
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    return [name for name, _ in in_backward_optimizer_filter(model.named_parameters())]


def dense_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The dense optimizer's per-parameter state by parameter name ("<param>/<state>" -> tensor);
    the same on every rank (DDP), so DCP writes it once."""
    names = _dense_params(model)
    state = opt.state_dict()["state"]
    return {f"{names[i]}/{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}


def _load_dense_optimizer(path: str, model: nn.Module, opt: torch.optim.Optimizer, saved: dict) -> None:
    names = _dense_params(model)
    index = {n: i for i, n in enumerate(names)}
    target: dict[str, torch.Tensor] = {}
    for key, meta in saved.items():
        if key.startswith("dense_optimizer."):
            target[key.removeprefix("dense_optimizer.")] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not target:
        return
    dcp.load({"dense_optimizer": target}, storage_reader=storage.dcp_reader(path))
    state: dict[int, dict] = {}
    for key, value in target.items():
        name, k = key.rsplit("/", 1)
        if name not in index:
            raise ConfigError(f"{path}: dense optimizer state for unknown parameter {name}")
        state.setdefault(index[name], {})[k] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _rank_state(rank: int, generators: dict[str, torch.Generator]) -> dict:
    out = {f"{rank}.{name}": g.get_state() for name, g in generators.items()}
    out[f"{rank}.torch"] = torch.get_rng_state()
    return out


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole (sharded tables gathered), by flat dotted key, in
    this process (no process group): for comparing checkpoints."""
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    nested: dict = {}
    reader = storage.dcp_reader(resolve(path))
    _load_state_dict(nested, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)

    def flat(x: dict, pre: str = "") -> dict:
        out = {}
        for k, v in x.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    return flat(nested)


# -- save and load


def save(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    cfg: Config,
    manifest: dict,
    dense_opt: torch.optim.Optimizer | None = None,
    generators: dict[str, torch.Generator] | None = None,
    position: dict | None = None,
    keep: int = 0,
) -> str:
    """Write checkpoint `step` of this process group (a collective: every rank calls it).

    `manifest`: what rank 0 records (the same on all ranks); `position`: this rank's data position
    (gathered into the manifest's `ranks`); `keep` > 0 prunes all but the newest `keep`.
    """
    t0 = time.perf_counter()
    base = root(out_dir)
    final = storage.join(base, f"step-{step:09d}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    # saved already (the last periodic one is the final one); a damaged one of this step is replaced
    exists = on_rank_zero(lambda: _intact(final))
    if rank == 0 and not exists:
        storage.make_dirs(base)
        for stale in _partial(base):  # writes that a crash interrupted
            storage.remove_tree(stale)
        storage.remove_tree(final)  # damaged (see `exists`)
    positions: list = [position]
    if world > 1:
        positions = [None] * world
        dist.all_gather_object(positions, position)
    if exists:
        return final
    if dist.is_initialized():
        dist.barrier()
    state = {
        "model": model.state_dict(),
        "sparse_optimizer": sparse_optimizer_state(model),
        "rng": _rank_state(rank, generators or {}),
    }
    if dense_opt is not None:
        state["dense_optimizer"] = dense_optimizer_state(model, dense_opt)
    dcp.save(state, storage_writer=storage.dcp_writer(final))
    faults.point("checkpoint", rank, step, out_dir)
    if rank == 0:
        storage.write_text(storage.join(final, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        files = {
            name: {"bytes": size, "sha256": storage.sha256(storage.join(final, name))}
            for name, size in sorted(storage.sizes(final).items())
        }
        full = {
            "format": FORMAT,
            "step": step,
            "world_size": world,
            "config_fingerprint": config_fingerprint(cfg),
            **manifest,
            "ranks": positions,
            "write_seconds": round(time.perf_counter() - t0, 3),
            "bytes": sum(f["bytes"] for f in files.values()),
            "files": files,
        }
        full["manifest_sha256"] = _manifest_digest(full)
        storage.write_text(storage.join(final, MANIFEST), json.dumps(full, indent=1))  # last: now it is complete
        _VERIFIED.add(_verified_key(final))
        if keep > 0:
            for old in list_checkpoints(base)[:-keep]:
                storage.remove(storage.join(old, MANIFEST))  # first: a pruning cut short leaves a partial one
                storage.remove_tree(old)
    if dist.is_initialized():
        dist.barrier()
    return final


def load(
    path: str | Path,
    model: nn.Module,
    dense_opt: torch.optim.Optimizer | None = None,
    generators: dict[str, torch.Generator] | None = None,
    verified: bool = False,
) -> dict:
    """Load a checkpoint into `model` in place, whatever its sharding now (and into the dense
    optimizer and this rank's generators when given: same world size only); return the manifest.
    A checkpoint directory is verified first (`verify`) unless `verified` (rank 0 did it, see
    trainer.resume.on_rank_zero); a run directory resolves to its newest intact checkpoint."""
    path = str(path) if verified else resolve(path)
    manifest = read_manifest(path) if verified else verify(path)
    saved = storage.dcp_reader(path).read_metadata().state_dict_metadata
    state: dict = {"model": model.state_dict()}
    opt = sparse_optimizer_state(model)
    if opt and any(k.startswith("sparse_optimizer.") for k in saved):
        state["sparse_optimizer"] = opt  # loaded in place into the live optimizer buffers
    rank = dist.get_rank() if dist.is_initialized() else 0
    if generators is not None:
        state["rng"] = _rank_state(rank, generators)
    dcp.load(state, storage_reader=storage.dcp_reader(path))
    model.load_state_dict(state["model"])
    if generators is not None:
        for name, g in generators.items():
            g.set_state(state["rng"][f"{rank}.{name}"])
        torch.set_rng_state(state["rng"][f"{rank}.torch"])
    if dense_opt is not None:
        _load_dense_optimizer(path, model, dense_opt, saved)
    return manifest

"""`dinrec plan`: torchrec's sharding planner offline, and the plan files training consumes.

The model is built on the meta device (no allocation, so billion-row tables plan on a laptop),
with the config's sparse optimizer attached as in training, so torchrec's storage estimate counts
the optimizer state, and our estimator adds MBA's 4 bytes per row (embedding/planner.py).

A plan file (docs/plan-format.md) is versioned JSON: per table its sharding type, compute kernel
and shards (offsets, sizes, rank, placement), per rank the planned HBM/DDR and step-time estimate,
and a fingerprint of what the plan depends on (table specs, optimizer, world size, compute device).
`dinrec train --plan FILE` checks it against the run and hands it to DistributedModelParallel.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from embedding.tables import FeatureLayout
from trainer.config import Config, ConfigError

PLAN_VERSION = 1
MAX_WORLD = 4096  # the largest world size an infeasible plan is retried with
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'80GiB', '512GB', '1.5TiB', '1073741824' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"size {text!r}: expected a number with an optional unit (e.g. 80GiB, 512GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(n: float) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def plan_inputs(cfg: Config):
    """(model on meta with the sparse optimizer attached, sharders, layout): what the planner
    sees, for `dinrec plan` and for training alike."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from embedding import mba_tbe
    from trainer.models import MODELS

    layout = FeatureLayout.from_config(cfg)
    model = MODELS[cfg.model.name](layout, cfg.model, len(cfg.data.dense_features), device=torch.device("meta"))
    sopt = cfg.sparse_optimizer
    base = {"sgd": torch.optim.SGD, "rowwise_adagrad": RowWiseAdagrad}[sopt.base]
    apply_optimizer_in_backward(base, model.sparse.parameters(), {"lr": sopt.lr})
    fused = None
    if sopt.mba:  # MBA rides on the base optimizer's fused kernel (embedding/mba_tbe.py)
        mba_tbe.install()
        fused = {mba_tbe.MBA_KEY: mba_tbe.MBAParams(lam=sopt.lam, counts=sopt.counts, kernel=sopt.kernel)}
    sharders = [EmbeddingCollectionSharder(fused_params=fused), EmbeddingBagCollectionSharder(fused_params=fused)]
    return model, sharders, layout


def fingerprint(cfg: Config, world_size: int, compute_device: str) -> str:
    """What a plan depends on: table specs, the sparse optimizer, world size, compute device."""
    sopt = cfg.sparse_optimizer
    spec = {"tables": [[t.name, t.num_rows, t.dim, list(t.features), list(t.sharding_types), t.compute_kernel,
                        t.min_partition] for t in cfg.tables],
            "optimizer": [sopt.base, sopt.mba], "world_size": world_size, "compute_device": compute_device}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _topology(world_size: int, compute_device: str, hbm: int | None, ddr: int | None, local_world_size: int | None):
    from torchrec.distributed.planner import Topology

    kwargs = {"world_size": world_size, "compute_device": compute_device}
    if hbm is not None:
        kwargs["hbm_cap"] = hbm
    if ddr is not None:
        kwargs["ddr_cap"] = ddr
    if local_world_size is not None:
        kwargs["local_world_size"] = local_world_size
    return Topology(**kwargs)


def _try_plan(model, sharders, layout, topology, batch_size, mba, dense_bytes):
    from torchrec.distributed.planner.types import PlannerError

    from embedding.planner import make_planner

    planner = make_planner(layout, topology, batch_size, mba, dense_bytes)
    try:
        return planner.plan(model, sharders), planner
    except PlannerError:
        return None, planner


def plan_offline(cfg: Config, world_size: int, compute_device: str = "cuda", hbm: int | None = None,
                 ddr: int | None = None, batch_size: int | None = None, local_world_size: int | None = None) -> dict:
    """Plan the config for a topology; returns the plan document (see docs/plan-format.md), or
    raises ConfigError with one line when the tables do not fit."""
    from embedding.dense_memory import dense_memory

    model, sharders, layout = plan_inputs(cfg)
    batch = batch_size or cfg.data.batch_size
    dense = dense_memory(cfg, batch)
    topology = _topology(world_size, compute_device, hbm, ddr, local_world_size)
    plan, planner = _try_plan(model, sharders, layout, topology, batch, cfg.sparse_optimizer.mba, sum(dense.values()))
    if plan is None:
        raise ConfigError(_infeasible(cfg, model, sharders, layout, topology, batch, hbm, ddr, local_world_size,
                                      sum(dense.values())))
    return plan_document(cfg, plan, planner._best_plan or [], topology, batch, dense)


def _infeasible(cfg, model, sharders, layout, topology, batch, hbm, ddr, local_world_size, dense_bytes) -> str:
    """One line: the biggest table against the memory the topology has, and the smallest world
    size at which the planner does find a plan."""
    from embedding.planner import (
        RESERVED_PERCENTAGE,
        constraints_for,
        make_enumerator,
        make_planner,
    )

    mba = cfg.sparse_optimizer.mba
    mem = "hbm" if topology.compute_device == "cuda" else "ddr"
    options = make_enumerator(layout, topology, batch, mba).enumerate(model, sharders)
    need: dict[str, int] = {}
    for o in options:  # the cheapest way to store each table
        total = sum(getattr(s.storage, mem) for s in o.shards)
        need[o.name] = min(need.get(o.name, total), total)
    cap = getattr(topology.devices[0].storage, mem)
    world = topology.world_size
    if dense_bytes >= cap * (1 - RESERVED_PERCENTAGE):  # replicated: no world size helps
        return (f"the dense side does not fit: it needs {gib(dense_bytes)} of {mem.upper()} on every rank (parameters, "
                f"gradients, optimizer state and activations at batch {batch} with full histories) but each rank has "
                f"{gib(cap)}, {gib(cap * (1 - RESERVED_PERCENTAGE))} after torchrec's {RESERVED_PERCENTAGE:.0%}; "
                f"a smaller --batch-size or more {mem.upper()} per rank")

    def plans_at(w: int) -> bool:
        t = _topology(w, topology.compute_device, hbm, ddr, local_world_size)
        return _try_plan(model, sharders, layout, t, batch, mba, dense_bytes)[0] is not None

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
        reserved = make_planner(layout, topology, batch, mba, dense_bytes)._storage_reservation.reserve(
            topology, batch, model, sharders, constraints_for(layout))
        usable = sum(getattr(d.storage, mem) for d in reserved.devices)
        avail = f"leave {gib(usable)} for tables after torchrec's reservation (dense side, inputs, 15%)"
    except (AttributeError, TypeError):
        avail = "are available (before torchrec's reservation for dense parameters and inputs)"
    big = max(need, key=need.get)
    where = f"world size {fits}" if fits else f"no world size up to {MAX_WORLD} (more memory per rank)"
    return (f"table '{big}' does not fit: it needs {gib(need[big])} of {mem.upper()} (all tables "
            f"{gib(sum(need.values()))}, optimizer state and MBA counts included) but {world} × {gib(cap)} "
            f"{avail}; the smallest that fits: {where}")


def plan_document(cfg: Config, plan, best_plan: list, topology, batch_size: int, dense: dict[str, int]) -> dict:
    tables: dict[str, dict] = {}
    for module, params in plan.plan.items():
        for name, ps in params.items():
            shards = []
            if ps.sharding_spec is not None:
                for s in ps.sharding_spec.shards:
                    shards.append({"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes),
                                   "rank": s.placement.rank(), "placement": str(s.placement)})
            tables[name] = {"module": module, "sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                            "ranks": list(ps.ranks or []), "shards": shards}
    # the dense side is replicated: every rank holds it, in HBM on GPUs, in DDR on the CPU
    on_gpu = topology.compute_device == "cuda"
    dense_bytes = sum(dense.values())
    ranks = [{"rank": r, "hbm_bytes": dense_bytes if on_gpu else 0, "ddr_bytes": 0 if on_gpu else dense_bytes,
              "table_bytes": 0, "step_time_ms": 0.0} for r in range(topology.world_size)]
    for option in best_plan:
        for s in option.shards:
            if s.rank is None:
                continue
            ranks[s.rank]["hbm_bytes"] += int(s.storage.hbm)
            ranks[s.rank]["ddr_bytes"] += int(s.storage.ddr)
            ranks[s.rank]["table_bytes"] += int(s.storage.hbm if on_gpu else s.storage.ddr)
            ranks[s.rank]["step_time_ms"] += float(s.perf.total)
    for r in ranks:
        r["step_time_ms"] = round(r["step_time_ms"], 3)
    dev = topology.devices[0].storage
    return {
        "version": PLAN_VERSION,
        "fingerprint": fingerprint(cfg, topology.world_size, topology.compute_device),
        "world_size": topology.world_size,
        "compute_device": topology.compute_device,
        "batch_size": batch_size,
        "dense_bytes": {"parameters": dense["parameters"], "activations": dense["activations"]},
        "capacity": {"hbm_bytes": int(dev.hbm), "ddr_bytes": int(dev.ddr)},
        "table_specs": {t.name: {"num_rows": t.num_rows, "dim": t.dim} for t in cfg.tables},
        "sparse_optimizer": cfg.sparse_optimizer.type,
        "tables": tables,
        "ranks": ranks,
    }


def sharding_plan(doc: dict):
    """A plan document -> torchrec ShardingPlan."""
    from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
    from torchrec.distributed.types import (
        EmbeddingModuleShardingPlan,
        ParameterSharding,
        ShardingPlan,
    )

    modules: dict[str, EmbeddingModuleShardingPlan] = {}
    for name, t in doc["tables"].items():
        spec = None
        if t["shards"]:
            spec = EnumerableShardingSpec([ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"],
                                                         placement=s["placement"]) for s in t["shards"]])
        modules.setdefault(t["module"], EmbeddingModuleShardingPlan())[name] = ParameterSharding(
            sharding_type=t["sharding_type"], compute_kernel=t["compute_kernel"], ranks=t["ranks"] or None,
            sharding_spec=spec)
    return ShardingPlan(modules)


def load_plan(path: str | Path, cfg: Config, world_size: int, compute_device: str):
    """Read and validate a plan file for this run; ConfigError (one line) if it does not match."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read plan ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not a JSON plan (line {e.lineno})") from None
    if not isinstance(doc, dict) or doc.get("version") != PLAN_VERSION:
        raise ConfigError(f"{path}: plan version {doc.get('version') if isinstance(doc, dict) else None!r}, "
                          f"this dinrec reads version {PLAN_VERSION}")
    hint = f"re-run `dinrec plan --world-size {world_size} --compute-device {compute_device} --out {path}`"
    if doc.get("world_size") != world_size:
        raise ConfigError(f"{path}: made for world size {doc.get('world_size')}, this run has {world_size} ({hint})")
    if doc.get("compute_device") != compute_device:
        raise ConfigError(f"{path}: made for {doc.get('compute_device')}, this run trains on {compute_device} ({hint})")
    specs = doc.get("table_specs", {})
    for t in cfg.tables:
        old = specs.get(t.name)
        if old is None:
            raise ConfigError(f"{path}: stale: no table '{t.name}' in the plan ({hint})")
        for key in ("num_rows", "dim"):
            if old.get(key) != getattr(t, key):
                raise ConfigError(f"{path}: stale: table '{t.name}' {key} was {old.get(key)}, "
                                  f"is {getattr(t, key)} ({hint})")
    if doc.get("fingerprint") != fingerprint(cfg, world_size, compute_device):
        raise ConfigError(f"{path}: stale: the tables' features, sharding hints, kernels or the sparse optimizer "
                          f"changed since the plan was made ({hint})")
    return sharding_plan(doc)


def print_plan(doc: dict) -> None:
    """Per table: sharding, kernel, shards and ranks; per rank: HBM, DDR, estimated step time."""
    print(f"plan for {doc['world_size']} × {doc['compute_device']} (HBM {gib(doc['capacity']['hbm_bytes'])}, "
          f"DDR {gib(doc['capacity']['ddr_bytes'])} each), batch {doc['batch_size']} per rank, "
          f"sparse optimizer {doc['sparse_optimizer']}")
    print(f"{'table':<16} {'rows':>14} {'dim':>5} {'sharding':<15} {'kernel':<18} {'shards':>6}  ranks")
    for name, t in doc["tables"].items():
        spec = doc["table_specs"][name]
        ranks = sorted({s["rank"] for s in t["shards"]}) or t["ranks"]
        shown = ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"
        print(f"{name:<16} {spec['num_rows']:>14,} {spec['dim']:>5} {t['sharding_type']:<15} "
              f"{t['compute_kernel']:<18} {len(t['shards']):>6}  {shown}")
    d = doc["dense_bytes"]
    print(f"dense side on every rank (measured at batch {doc['batch_size']}, full histories): parameters with "
          f"gradients and optimizer state {gib(d['parameters'])}, activations {gib(d['activations'])}")
    print(f"{'rank':>5} {'HBM':>12} {'DDR':>12} {'of which tables':>16} {'step, torchrec estimate':>24}")
    for r in doc["ranks"]:
        print(f"{r['rank']:>5} {gib(r['hbm_bytes']):>12} {gib(r['ddr_bytes']):>12} {gib(r['table_bytes']):>16} "
              f"{r['step_time_ms']:>21.3f} ms")

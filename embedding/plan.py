"""Plan files: what `dinrec plan` writes and `dinrec train --plan FILE` consumes.

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

from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan

from trainer import storage
from trainer.config import Config, ConfigError

PLAN_VERSION = 1
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


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


def fingerprint(cfg: Config, world_size: int, compute_device: str) -> str:
    """What a plan depends on: table specs, the sparse optimizer, world size, compute device."""
    sopt = cfg.sparse_optimizer
    spec = {
        "tables": [
            [t.name, t.num_rows, t.dim, list(t.features), list(t.sharding_types), t.compute_kernel, t.min_partition]
            for t in cfg.tables
        ],
        "optimizer": [sopt.base, sopt.mba],
        "world_size": world_size,
        "compute_device": compute_device,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def plan_document(cfg: Config, plan, best_plan: list, topology, batch_size: int, dense: dict[str, int]) -> dict:
    tables: dict[str, dict] = {}
    for module, params in plan.plan.items():
        for name, ps in params.items():
            shards = []
            if ps.sharding_spec is not None:
                for s in ps.sharding_spec.shards:
                    shards.append(
                        {
                            "offsets": list(s.shard_offsets),
                            "sizes": list(s.shard_sizes),
                            "rank": s.placement.rank(),
                            "placement": str(s.placement),
                        }
                    )
            tables[name] = {
                "module": module,
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks or []),
                "shards": shards,
            }
    # the dense side is replicated: every rank holds it, in HBM on GPUs, in DDR on the CPU
    on_gpu = topology.compute_device == "cuda"
    dense_bytes = sum(dense.values())
    ranks = [
        {
            "rank": r,
            "hbm_bytes": dense_bytes if on_gpu else 0,
            "ddr_bytes": 0 if on_gpu else dense_bytes,
            "table_bytes": 0,
            "step_time_ms": 0.0,
        }
        for r in range(topology.world_size)
    ]
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
    modules: dict[str, EmbeddingModuleShardingPlan] = {}
    for name, t in doc["tables"].items():
        spec = None
        if t["shards"]:
            spec = EnumerableShardingSpec(
                [
                    ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"], placement=s["placement"])
                    for s in t["shards"]
                ]
            )
        modules.setdefault(t["module"], EmbeddingModuleShardingPlan())[name] = ParameterSharding(
            sharding_type=t["sharding_type"],
            compute_kernel=t["compute_kernel"],
            ranks=t["ranks"] or None,
            sharding_spec=spec,
        )
    return ShardingPlan(modules)


def load_plan(path: str | Path, cfg: Config, world_size: int, compute_device: str):
    """Read and validate a plan file for this run; ConfigError (one line) if it does not match."""
    path = str(path)
    try:
        doc = json.loads(storage.read_text(path))
    except storage.StorageError as e:
        raise ConfigError(f"{path}: cannot read plan ({str(e).removeprefix(path + ': ')})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not a JSON plan (line {e.lineno})") from None
    if not isinstance(doc, dict) or doc.get("version") != PLAN_VERSION:
        raise ConfigError(
            f"{path}: plan version {doc.get('version') if isinstance(doc, dict) else None!r}, "
            f"this dinrec reads version {PLAN_VERSION}"
        )
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
                raise ConfigError(
                    f"{path}: stale: table '{t.name}' {key} was {old.get(key)}, is {getattr(t, key)} ({hint})"
                )
    if doc.get("fingerprint") != fingerprint(cfg, world_size, compute_device):
        raise ConfigError(
            f"{path}: stale: the tables' features, sharding hints, kernels or the sparse optimizer "
            f"changed since the plan was made ({hint})"
        )
    return sharding_plan(doc)


def print_plan(doc: dict) -> None:
    """Per table: sharding, kernel, shards and ranks; per rank: HBM, DDR, estimated step time."""
    print(
        f"plan for {doc['world_size']} × {doc['compute_device']} (HBM {gib(doc['capacity']['hbm_bytes'])}, "
        f"DDR {gib(doc['capacity']['ddr_bytes'])} each), batch {doc['batch_size']} per rank, "
        f"sparse optimizer {doc['sparse_optimizer']}"
    )
    print(f"{'table':<16} {'rows':>14} {'dim':>5} {'sharding':<15} {'kernel':<18} {'shards':>6}  ranks")
    for name, t in doc["tables"].items():
        spec = doc["table_specs"][name]
        ranks = sorted({s["rank"] for s in t["shards"]}) or t["ranks"]
        shown = ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"
        print(
            f"{name:<16} {spec['num_rows']:>14,} {spec['dim']:>5} {t['sharding_type']:<15} "
            f"{t['compute_kernel']:<18} {len(t['shards']):>6}  {shown}"
        )
    d = doc["dense_bytes"]
    print(
        f"dense side on every rank (measured at batch {doc['batch_size']}, full histories): parameters with "
        f"gradients and optimizer state {gib(d['parameters'])}, activations {gib(d['activations'])}"
    )
    print(f"{'rank':>5} {'HBM':>12} {'DDR':>12} {'of which tables':>16} {'step, torchrec estimate':>24}")
    for r in doc["ranks"]:
        print(
            f"{r['rank']:>5} {gib(r['hbm_bytes']):>12} {gib(r['ddr_bytes']):>12} {gib(r['table_bytes']):>16} "
            f"{r['step_time_ms']:>21.3f} ms"
        )

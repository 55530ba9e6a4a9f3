"""Per-row sample counts n_j for mini-batch-aware regularization (DIN paper Eq. 4–7).

n_j = the number of training samples in which row j of a table is looked up at least once, by
any feature of that table (candidate and history alike), after id mapping and the history cut
to `data.max_hist_len`: exactly the rows the model looks up. `dinrec count-features` writes one
uint32 array per table (`<table>.npy`, 4 bytes per row) and a manifest with what they were
counted from, in `counts/` next to the training files.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
from tqdm import tqdm

from embedding.layout import FeatureLayout
from trainer import storage
from trainer.config import Config, ConfigError, TableConfig
from trainer.data import ParquetStream, resolve_paths

FORMAT = 1


def counts_dir(cfg: Config) -> str:
    return storage.join(storage.parent(resolve_paths(cfg.data.train)[0]), "counts")


def fingerprint(cfg: Config, table: TableConfig, files: list[str]) -> str:
    """What a table's counts depend on: its rows, features, id map, the history cut, the files."""
    infos = [storage.info(f) for f in files]
    stats = [(f, i.size, i.mtime_ns) for f, i in zip(files, infos, strict=True)]
    key = json.dumps([FORMAT, table.num_rows, sorted(table.features), table.id_map, cfg.data.max_hist_len, stats])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def count_rows(stream: ParquetStream, progress: bool = True) -> tuple[dict[str, np.ndarray], int]:
    """n_j for every table of the stream's layout, over all its row groups; also the sample count."""
    layout = stream.layout
    tables = layout.tables
    counts = {t.name: np.zeros(t.num_rows, np.uint32) for t in tables}
    samples = 0
    with tqdm(total=stream.num_rows, unit="samples", unit_scale=True, desc="count", disable=not progress) as bar:
        for n, lists in stream.row_groups():
            for t in tables:
                # (sample, row) pairs over all the table's features, each pair counted once
                sample_ids = [np.repeat(np.arange(n, dtype=np.int64), np.diff(lists[f][0])) for f in t.features]
                rows = [lists[f][1] for f in t.features]
                pairs = np.unique(np.concatenate(sample_ids) * t.num_rows + np.concatenate(rows))
                counts[t.name] += np.bincount(pairs % t.num_rows, minlength=t.num_rows).astype(np.uint32)
            samples += n
            bar.update(n)
    return counts, samples


def write_counts(cfg: Config, progress: bool = True) -> dict:
    """`dinrec count-features`: count the training data, write counts/ next to it."""
    files = resolve_paths(cfg.data.train)
    stream = ParquetStream(
        files,
        FeatureLayout.from_config(cfg),
        batch_size=cfg.data.batch_size,
        max_hist_len=cfg.data.max_hist_len,
        shuffle=False,
    )
    t0 = time.perf_counter()
    counts, samples = count_rows(stream, progress)
    out = counts_dir(cfg)
    manifest = {"format": FORMAT, "samples": samples, "files": files, "tables": {}}
    for t in cfg.tables:
        buf = io.BytesIO()
        np.save(buf, counts[t.name], allow_pickle=False)
        storage.write_bytes(storage.join(out, f"{t.name}.npy"), buf.getvalue())
        manifest["tables"][t.name] = {
            "num_rows": t.num_rows,
            "fingerprint": fingerprint(cfg, t, files),
            "rows_touched": int((counts[t.name] > 0).sum()),
            "max_count": int(counts[t.name].max()),
        }
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest, indent=2))
    return {
        "counts": out,
        "samples": samples,
        "seconds": round(time.perf_counter() - t0, 2),
        "tables": manifest["tables"],
    }


def load_counts(cfg: Config, table: TableConfig) -> np.ndarray:
    """A table's n_j as written by `dinrec count-features`; ConfigError if missing or stale."""
    out = counts_dir(cfg)
    hint = f"run `dinrec count-features --config …` for data.train={cfg.data.train}"
    try:
        manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    except (storage.StorageError, json.JSONDecodeError):
        raise ConfigError(f"{out}: no feature counts ({hint})") from None
    entry = manifest.get("tables", {}).get(table.name)
    if entry is None:
        raise ConfigError(f"{out}: no counts for table '{table.name}' ({hint})")
    files = resolve_paths(cfg.data.train)
    if entry["fingerprint"] != fingerprint(cfg, table, files):
        raise ConfigError(
            f"{out}: counts of table '{table.name}' are stale (counted for {entry['num_rows']} rows; the "
            f"table, max_hist_len or the training files changed since) ({hint})"
        )
    counts = np.load(io.BytesIO(storage.read_bytes(storage.join(out, f"{table.name}.npy"))), allow_pickle=False)
    if counts.shape != (table.num_rows,):
        raise ConfigError(f"{out}/{table.name}.npy: {counts.shape[0]} rows, table has {table.num_rows}")
    return counts

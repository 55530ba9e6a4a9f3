"""n_j from `dinrec count-features` against a per-sample Python count; missing and stale counts."""

import json
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedding.tables import hash_ids
from launch.cli import main
from tests.conftest import ROOT
from trainer.config import ConfigError
from trainer.counts import load_counts
from trainer.data import resolve_paths


def python_counts(cfg):
    """For each table, in how many samples each row occurs at least once (any of its features)."""
    t = pq.read_table(resolve_paths(cfg.data.train)).to_pylist()
    out = {}
    for table in cfg.tables:
        c = Counter()
        for row in t:
            ids = set()
            for f in table.features:
                v = row[f] if isinstance(row[f], list) else [row[f]]
                if f.startswith("hist_"):
                    v = v[-cfg.data.max_hist_len :]
                if table.id_map == "hash":
                    v = hash_ids(np.array(v, dtype=np.int64), table.num_rows).tolist()
                ids.update(v)
            c.update(ids)
        out[table.name] = c
    return out


def test_counts_match_a_per_sample_count(tiny_cfg, tiny_train_copy, capsys):
    data = tiny_train_copy
    cfg = tiny_cfg(f"data.train={data}", "data.max_hist_len=7")
    args = [
        "count-features",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--no-progress",
        f"data.train={data}",
        "data.max_hist_len=7",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 2100
    expected = python_counts(cfg)
    for table in cfg.tables:
        n = load_counts(cfg, table)
        assert n.dtype == np.uint32 and n.shape == (table.num_rows,)  # 4 bytes per row
        want = np.zeros(table.num_rows, np.int64)
        for row, k in expected[table.name].items():
            want[row] = k
        np.testing.assert_array_equal(n, want, err_msg=table.name)
        assert summary["tables"][table.name]["rows_touched"] == int((want > 0).sum())
    # stale: another table size, another history cut, a rewritten file
    with pytest.raises(ConfigError, match="counts of table 'item' are stale"):
        load_counts(
            tiny_cfg(f"data.train={data}", "data.max_hist_len=7", "tables.0.num_rows=600"),
            tiny_cfg(f"data.train={data}", "tables.0.num_rows=600").tables[0],
        )
    with pytest.raises(ConfigError, match="stale"):
        load_counts(tiny_cfg(f"data.train={data}"), cfg.tables[1])
    f = next(data.glob("*.parquet"))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match="stale"):
        load_counts(cfg, cfg.tables[0])


def test_missing_counts_say_how_to_make_them(tiny_cfg, tiny_data):
    cfg = tiny_cfg()
    with pytest.raises(ConfigError, match="no feature counts .*dinrec count-features"):
        load_counts(cfg, cfg.tables[0])


def test_static_counts_reach_every_mba_shard(tiny_cfg, tiny_train_copy, tiny_data, tmp_path, capsys):
    """`counts: static` puts each shard's rows of the count-features file into its MBA state."""
    import torch

    from embedding import mba_tbe
    from trainer.sharding import build_model, process_group

    data = tiny_train_copy
    overrides = [
        f"data.train={data}",
        f"data.test={tiny_data / 'test'}",
        "sparse_optimizer.type=rowwise_adagrad_mba",
        "sparse_optimizer.lambda=0.1",
        "sparse_optimizer.counts=static",
        "tables.1.sharding_types=[column_wise]",
    ]
    cfg = tiny_cfg(*overrides)
    # without the counts: one line that says how to make them, exit code 2
    assert (
        main(["train", "--config", str(ROOT / "configs/tiny.yaml"), *overrides, f"train.out_dir={tmp_path / 'run'}"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dinrec count-features" in err[0]
    assert main(["count-features", "--config", str(ROOT / "configs/tiny.yaml"), "--no-progress", *overrides]) == 0
    with process_group(cfg):
        model = build_model(cfg, 1, torch.device("cpu"))
    seen = set()
    for kernel, module in mba_tbe.mba_modules(model):
        for table, counts in zip(kernel.config.embedding_tables, module.counts_by_table(), strict=True):
            r0 = table.local_metadata.shard_offsets[0]
            full = load_counts(cfg, next(t for t in cfg.tables if t.name == table.name))
            np.testing.assert_array_equal(counts.numpy(), full[r0 : r0 + counts.numel()].astype(np.int32))
            seen.add(table.name)
    assert seen == {t.name for t in cfg.tables}

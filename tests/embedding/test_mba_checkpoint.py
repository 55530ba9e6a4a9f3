"""MBA state in checkpoints: after one epoch with online counts, the checkpoint holds n_j, and a
fresh model that loads it has, for every shard, exactly the counts `dinrec count-features` finds
in the training data (one epoch sees every training sample once)."""

import numpy as np
import torch

from embedding import mba_tbe
from launch.cli import main
from tests.conftest import ROOT
from trainer.counts import load_counts


def test_checkpoint_restores_mba_counts_and_adagrad_state(tiny_data, tiny_train_copy, tmp_path):
    from trainer import checkpoint
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.sharding import build_model, process_group

    data = tiny_train_copy
    overrides = [
        f"data.train={data}",
        f"data.test={tiny_data / 'test'}",
        f"train.out_dir={tmp_path / 'run'}",
        "train.epochs=1",
        "sparse_optimizer.type=rowwise_adagrad_mba",
        "sparse_optimizer.lambda=0.1",
        "sparse_optimizer.counts=online",
        "tables.1.sharding_types=[column_wise]",
    ]
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    train(cfg, progress=False)
    assert main(["count-features", "--config", str(ROOT / "configs/tiny.yaml"), "--no-progress", *overrides]) == 0
    with process_group(cfg):
        model = build_model(cfg, 1, torch.device("cpu"))
        checkpoint.load(tmp_path / "run", model)
    seen = set()
    for kernel, module in mba_tbe.mba_modules(model):
        sums = [s["sum"] for s in module.inner.get_optimizer_state()]
        for table, counts, s in zip(kernel.config.embedding_tables, module.counts_by_table(), sums, strict=True):
            r0 = table.local_metadata.shard_offsets[0]
            full = load_counts(cfg, next(t for t in cfg.tables if t.name == table.name))
            want = full[r0 : r0 + counts.numel()].astype(np.int32)
            np.testing.assert_array_equal(counts.numpy(), want, err_msg=table.name)
            # Adagrad's sums came back too: positive exactly on the rows the epoch touched
            np.testing.assert_array_equal(s.numpy() > 0, want > 0, err_msg=table.name)
            seen.add(table.name)
    assert seen == {t.name for t in cfg.tables}

"""The planner counts MBA's per-row state: exactly 4 bytes per row of every shard, on the memory
that holds the shard (DDR for CPU plans, HBM for GPU plans; planned without a GPU)."""

import pytest
import torch
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import Topology
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embedding.layout import FeatureLayout
from embedding.planner import make_enumerator
from trainer.models import MODELS


def options(cfg, device_type, world, mba):
    layout = FeatureLayout.from_config(cfg)
    model = MODELS[cfg.model.name](layout, cfg.model, 0, device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse.parameters(), {"lr": 0.1})
    enumerator = make_enumerator(layout, Topology(world_size=world, compute_device=device_type), 64, mba)
    return enumerator.enumerate(model, [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()])


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_mba_adds_four_bytes_per_row_to_every_shard(tiny_cfg, device_type):
    cfg = tiny_cfg()
    plain, with_mba = options(cfg, device_type, 2, False), options(cfg, device_type, 2, True)
    assert [(o.name, o.sharding_type) for o in plain] == [(o.name, o.sharding_type) for o in with_mba]
    kinds = set()
    for a, b in zip(plain, with_mba, strict=True):
        kinds.add(a.sharding_type)
        for sa, sb in zip(a.shards, b.shards, strict=True):
            rows = sa.size[0]
            hbm, ddr = sb.storage.hbm - sa.storage.hbm, sb.storage.ddr - sa.storage.ddr
            assert (hbm, ddr) == ((4 * rows, 0) if device_type == "cuda" else (0, 4 * rows)), (a.name, a.sharding_type)
    assert {"table_wise", "column_wise", "row_wise"} <= kinds  # shards of several shapes were checked

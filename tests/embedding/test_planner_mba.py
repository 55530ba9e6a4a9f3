"""The planner counts the per-row states torchrec's estimate leaves out: MBA's n_j and partial
row-wise Adam's v_j, exactly 4 bytes per row of every shard each, on the memory that holds the
shard (DDR for CPU plans, HBM for GPU plans; planned without a GPU)."""

import pytest
import torch
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import Topology
from torchrec.optim import PartialRowWiseAdam, RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embedding.layout import FeatureLayout
from embedding.planner import extra_row_bytes, make_enumerator
from trainer.config import SparseOptimizerConfig
from trainer.models import MODELS


def options(cfg, device_type, world, optimizer, row_bytes):
    layout = FeatureLayout.from_config(cfg)
    model = MODELS[cfg.model.name](layout, cfg.model, 0, device=torch.device("meta"))
    apply_optimizer_in_backward(optimizer, model.sparse.parameters(), {"lr": 0.1})
    enumerator = make_enumerator(layout, Topology(world_size=world, compute_device=device_type), 64, row_bytes)
    return enumerator.enumerate(model, [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()])


def test_the_extra_bytes_per_row_of_each_optimizer():
    def of(kind):
        return extra_row_bytes(SparseOptimizerConfig(type=kind, lam=0.01 if kind.endswith("_mba") else 0.0))

    assert [of(k) for k in ("sgd", "rowwise_adagrad", "adam", "partial_rowwise_adam")] == [0, 0, 0, 4]
    assert [of(k) for k in ("sgd_mba", "rowwise_adagrad_mba", "adam_mba", "partial_rowwise_adam_mba")] == [4, 4, 4, 8]


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("optimizer", [RowWiseAdagrad, PartialRowWiseAdam])
def test_mba_adds_four_bytes_per_row_to_every_shard(tiny_cfg, device_type, optimizer):
    cfg = tiny_cfg()
    plain, with_mba = options(cfg, device_type, 2, optimizer, 0), options(cfg, device_type, 2, optimizer, 4)
    assert [(o.name, o.sharding_type) for o in plain] == [(o.name, o.sharding_type) for o in with_mba]
    kinds = set()
    for a, b in zip(plain, with_mba, strict=True):
        kinds.add(a.sharding_type)
        for sa, sb in zip(a.shards, b.shards, strict=True):
            rows = sa.size[0]
            hbm, ddr = sb.storage.hbm - sa.storage.hbm, sb.storage.ddr - sa.storage.ddr
            assert (hbm, ddr) == ((4 * rows, 0) if device_type == "cuda" else (0, 4 * rows)), (a.name, a.sharding_type)
    assert {"table_wise", "column_wise", "row_wise"} <= kinds  # shards of several shapes were checked

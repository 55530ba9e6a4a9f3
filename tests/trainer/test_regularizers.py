"""The baselines of the regularization experiment: id dropout and plain L2 on every row."""

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.batch import drop_ids
from trainer.config import ConfigError
from trainer.data import stream_from_config


def test_drop_ids_drops_whole_behaviours_per_sample():
    rng = np.random.default_rng(0)
    keys = ["item_id", "hist_item_id", "hist_cate_id"]
    b = 50
    hist = rng.integers(0, 30, b)
    lengths = {"item_id": np.ones(b, int), "hist_item_id": hist, "hist_cate_id": hist}
    values = {"item_id": rng.integers(0, 1000, b), "hist_item_id": rng.integers(0, 1000, hist.sum())}
    values["hist_cate_id"] = values["hist_item_id"] % 7  # the category of each behaviour
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor(np.concatenate([values[k] for k in keys])),
        lengths=torch.tensor(np.concatenate([lengths[k] for k in keys]), dtype=torch.int32),
    )
    out = drop_ids(kjt, {"hist_item_id", "hist_cate_id"}, 0.5, torch.Generator().manual_seed(1)).to_dict()
    src = kjt.to_dict()
    assert torch.equal(out["item_id"].values(), src["item_id"].values())  # untouched feature
    items = (src["hist_item_id"].to_dense(), out["hist_item_id"].to_dense())
    cates = out["hist_cate_id"].to_dense()
    kept = total = 0
    for s in range(b):  # each sample keeps a subsequence of its own behaviours, item and cate aligned
        before, after = items[0][s].tolist(), items[1][s].tolist()
        it = iter(before)
        assert all(any(x == y for y in it) for x in after)
        assert cates[s].tolist() == [x % 7 for x in after]
        kept, total = kept + len(after), total + len(before)
    assert abs(kept / total - 0.5) < 4 * np.sqrt(0.25 / total)  # binomial, 4 sigma
    assert torch.equal(drop_ids(kjt, {"hist_item_id", "hist_cate_id"}, 0.0, torch.Generator()).values(), kjt.values())


@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad"])
def test_l2_all_decays_every_row_exactly(tiny_cfg, opt):
    """One step with plain L2. SGD: w1 = w0 − lr·(g + l2·w0) for every row; with l2 = 0 the same
    step gives w0 − lr·g, so the two differ by exactly lr·l2·w0 (untouched rows: only the decay).
    Row-wise Adagrad (decoupled decay): w1 = (1 − lr·l2)·w0 − lr·g/(√s + ε) with the same g and s,
    so the difference is again lr·l2·w0."""
    from tests.conftest import full_state_dict
    from trainer.sharding import all_rows_decay, build_model, dense_optimizer, process_group
    from trainer.step import train_step

    lr, l2 = 0.5, 0.1
    states = []
    for coef in (0.0, l2):
        cfg = tiny_cfg(f"sparse_optimizer.type={opt}", f"sparse_optimizer.lr={lr}", f"sparse_optimizer.l2_all={coef}")
        batch = next(iter(stream_from_config(cfg, "train", 0, 1).epoch(0)))
        with process_group(cfg):
            model = build_model(cfg, 1, torch.device("cpu"))
            w0 = full_state_dict(model)
            train_step(model, dense_optimizer(cfg, model), batch, all_rows_decay(cfg, model))
            states.append(full_state_dict(model))
    tables = [k for k in w0 if k.startswith("sparse.") and k.endswith(".weight")]
    assert tables
    for k in tables:
        torch.testing.assert_close(states[1][k], states[0][k] - lr * l2 * w0[k], atol=1e-6, rtol=0, msg=k)


def test_regularizer_config_errors(tiny_cfg):
    with pytest.raises(ConfigError, match="id_dropout: must be in"):
        tiny_cfg("model.id_dropout=1.0")
    with pytest.raises(ConfigError, match=r"l2_all: lr·l2_all = 2 >= 1"):
        tiny_cfg("sparse_optimizer.type=rowwise_adagrad", "sparse_optimizer.lr=4", "sparse_optimizer.l2_all=0.5")
    with pytest.raises(ConfigError, match=r"lr·lambda = 8 >= 1.*choose lambda < 0.125"):
        tiny_cfg("sparse_optimizer.type=sgd_mba", "sparse_optimizer.lr=8", "sparse_optimizer.lambda=1")
    with pytest.raises(ConfigError, match="lambda: set, but type 'sgd' has no MBA"):
        tiny_cfg("sparse_optimizer.type=sgd", "sparse_optimizer.lambda=0.1")

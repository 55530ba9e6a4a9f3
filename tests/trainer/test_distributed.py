"""A k-rank run equals a 1-rank run on the same global batches (gloo, 2 processes)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import free_port
from trainer.batch import Batch
from trainer.data import stream_from_config

pytestmark = pytest.mark.multiprocess

STEPS = 6


def concat(a: Batch, b: Batch) -> Batch:
    """The global batch: a's rows then b's rows."""

    def cat(x: KeyedJaggedTensor, y: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if not x.keys():  # no feature of this kind (BaseModel and the baselines: no sequence features)
            return x
        jx, jy = x.to_dict(), y.to_dict()
        return KeyedJaggedTensor(
            keys=x.keys(),
            values=torch.cat([torch.cat([jx[k].values(), jy[k].values()]) for k in x.keys()]),
            lengths=torch.cat([torch.cat([jx[k].lengths(), jy[k].lengths()]) for k in x.keys()]),
        )

    return Batch(
        cat(a.sparse, b.sparse),
        torch.cat([a.dense, b.dense]),
        torch.cat([a.labels, b.labels]),
        torch.cat([a.users, b.users]),
        pooled=cat(a.pooled, b.pooled) if a.pooled is not None else None,
    )


def worker(rank, world, port, cfg, batches, out):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    from tests.conftest import full_state_dict
    from trainer.sharding import build_model, dense_optimizer, store_on
    from trainer.step import Steps

    dist.init_process_group("gloo", store=store_on("127.0.0.1", port, world, rank == 0), rank=rank, world_size=world)
    try:
        model = build_model(cfg, world, torch.device("cpu"))
        plan = {k: v.sharding_type for m in model.plan.plan.values() for k, v in m.items()}
        opt = dense_optimizer(cfg, model)
        init = full_state_dict(model)
        steps = Steps(model, opt, torch.device("cpu"))  # the pipelined step training runs
        losses = [float(loss) for loss in steps.run(b[rank] if world > 1 else b for b in batches)]
        state = full_state_dict(model)
        if rank == 0:
            torch.save({"state": state, "init": init, "losses": losses, "plan": plan}, out)
        else:
            torch.save({"losses": losses}, out + f".{rank}")
        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # done: no interpreter finalization after gloo (see launch.process.exit_now)


def run(world, cfg, batches, out):
    mp.start_processes(worker, args=(world, free_port(), cfg, batches, out), nprocs=world, start_method="spawn")
    res = torch.load(out, weights_only=False)
    if world > 1:
        res["losses_1"] = torch.load(out + ".1", weights_only=False)["losses"]
    return res


@pytest.mark.parametrize(
    ("sharding", "optimizer", "model"),
    [
        ("table_wise", "sgd", "din"),
        ("table_wise", "rowwise_adagrad", "din"),
        ("column_wise", "sgd", "din"),
        ("column_wise", "rowwise_adagrad", "din"),
        # DIEN: its auxiliary loss (a mean over each rank's rows) and the reader's negatives too
        ("table_wise", "sgd", "dien"),
        # the zoo on the world with profile and context features (every table in the lookup)
        ("table_wise", "sgd_mba", "mian"),
        ("column_wise", "rowwise_adagrad", "deepfm"),
    ],
)
def test_two_ranks_equal_one_rank_on_the_same_global_batches(request, tmp_path, sharding, optimizer, model):
    make = request.getfixturevalue("zoo_cfg" if model in ("mian", "deepfm") else "tiny_cfg")
    n_tables = len(make().tables)
    overrides = [f"tables.{i}.sharding_types=[{sharding}]" for i in range(n_tables)]
    if optimizer.endswith("_mba"):
        overrides.append("sparse_optimizer.lambda=0.05")
    if model == "mian":
        # the attention's key bias has no true gradient (it adds the same to every key's score),
        # so its gradient is rounding noise, which Adam's m/sqrt(v) scales up to steps that depend
        # on the summation order; plain SGD keeps rounding at rounding size
        overrides += ["dense_optimizer.type=sgd", "dense_optimizer.lr=0.1"]
    cfg = make(
        f"model.name={model}",
        "model.activation=prelu",
        f"sparse_optimizer.type={optimizer}",
        "sparse_optimizer.lr=0.5",
        "dense_optimizer.lr=0.01",
        "data.batch_size=32",
        *overrides,
    )
    r0, r1 = (stream_from_config(cfg, "train", rank=r, world_size=2) for r in range(2))
    per_rank = [pair for _, pair in zip(range(STEPS), zip(r0.epoch(0), r1.epoch(0), strict=True), strict=False)]
    two = run(2, cfg, per_rank, str(tmp_path / "two.pt"))
    one = run(1, cfg, [concat(a, b) for a, b in per_rank], str(tmp_path / "one.pt"))
    assert set(two["plan"].values()) == {sharding}, two["plan"]
    assert one["state"].keys() == two["state"].keys()
    for key, w1 in one["state"].items():
        torch.testing.assert_close(two["state"][key], w1, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    # the global loss is the mean of the two local means
    for l1, a, b in zip(one["losses"], two["losses"], two["losses_1"], strict=True):
        assert abs(l1 - (a + b) / 2) < 1e-5
    # both started from the same weights, and training moved every table
    for key, w0 in one["init"].items():
        torch.testing.assert_close(two["init"][key], w0, atol=0, rtol=0, msg=key)
        if "embedding" in key:
            assert not torch.equal(w0, one["state"][key]), key

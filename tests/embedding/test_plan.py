"""`dinrec plan` and plan files: a written plan shards training exactly like planning on the fly
(2 gloo ranks), stale plans are refused, infeasible configs fail in one line, the billion-row
config plans for 64 GPUs within their memory."""

import json
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embedding.plan import load_plan, parse_size
from launch.cli import main
from tests.conftest import ROOT, free_port
from trainer.config import ConfigError, load_config

TINY = str(ROOT / "configs/tiny.yaml")


def shard_layout(model):
    return {
        name: (
            ps.sharding_type,
            ps.compute_kernel,
            list(ps.ranks or []),
            [(list(s.shard_offsets), list(s.shard_sizes), str(s.placement)) for s in ps.sharding_spec.shards],
        )
        for params in model.plan.plan.values()
        for name, ps in params.items()
    }


def worker(rank, world, port, overrides, out):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    from trainer.sharding import build_model, store_on

    dist.init_process_group("gloo", store=store_on("127.0.0.1", port, world, rank == 0), rank=rank, world_size=world)
    try:
        layouts = [shard_layout(build_model(load_config(TINY, o), world, torch.device("cpu"))) for o in overrides]
        if rank == 0:
            with open(out, "w") as f:
                json.dump(layouts, f)
        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # done: no interpreter finalization after gloo (see launch.cli.entry)


@pytest.mark.multiprocess
def test_plan_file_shards_like_planning_on_the_fly(tiny_data, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    base = [
        f"data.train={tiny_data / 'train'}",
        "sparse_optimizer.type=sgd_mba",
        "sparse_optimizer.lambda=0.01",
        "tables.1.sharding_types=[column_wise]",
    ]
    assert (
        main(["plan", "--config", TINY, "--world-size", "2", "--compute-device", "cpu", "--out", str(plan), *base]) == 0
    )
    printed = capsys.readouterr().out
    assert "item" in printed and "rank" in printed
    doc = json.loads(plan.read_text())
    assert doc["version"] == 1 and doc["world_size"] == 2 and len(doc["ranks"]) == 2
    out = tmp_path / "layouts.json"
    mp.start_processes(
        worker, args=(2, free_port(), [base, [*base, f"train.plan={plan}"]], str(out)), nprocs=2, start_method="spawn"
    )
    on_the_fly, from_file = json.loads(out.read_text())
    assert on_the_fly == from_file
    assert on_the_fly["cate"][0] == "column_wise" and {t for t in on_the_fly} == {"item", "cate", "user"}


def test_stale_plans_are_refused(tiny_data, tmp_path):
    plan = tmp_path / "plan.json"
    assert (
        main(["plan", "--config", TINY, "--world-size", "2", "--compute-device", "cpu", "--out", str(plan), "--json"])
        == 0
    )
    cfg = load_config(TINY)
    load_plan(plan, cfg, 2, "cpu")  # the matching run accepts it
    with pytest.raises(ConfigError, match="made for world size 2, this run has 1"):
        load_plan(plan, cfg, 1, "cpu")
    with pytest.raises(ConfigError, match="made for cpu, this run trains on cuda"):
        load_plan(plan, cfg, 2, "cuda")
    with pytest.raises(ConfigError, match="stale: table 'item' num_rows was 500, is 600"):
        load_plan(plan, load_config(TINY, ["tables.0.num_rows=600"]), 2, "cpu")
    with pytest.raises(ConfigError, match="stale: the tables' features"):
        load_plan(plan, load_config(TINY, ["sparse_optimizer.type=sgd"]), 2, "cpu")
    plan.write_text(json.dumps({**json.loads(plan.read_text()), "version": 99}))
    with pytest.raises(ConfigError, match="plan version 99"):
        load_plan(plan, cfg, 2, "cpu")


def test_infeasible_plan_names_the_table_and_the_world_size_that_fits(capsys):
    # at batch 1, tiny's dense side takes ~68 KiB and its tables ~38 KiB with the optimizer state;
    # a 110 KiB GPU leaves ~25 KiB for tables after the reservation, so one GPU is too few, two do
    args = ["plan", "--config", TINY, "--hbm", "110KiB", "--batch-size", "1"]
    assert main([*args, "--world-size", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "does not fit: it needs" in err[0] and "1 × 110.0 KiB leave" in err[0]
    assert err[0].endswith("the smallest that fits: world size 2")
    assert main([*args, "--world-size", "2", "--json"]) == 0


def test_a_dense_side_larger_than_the_device_is_named(capsys):
    # at batch 64 the dense side alone (~600 KiB, mostly activations) exceeds a 160 KiB GPU: no world size helps
    assert main(["plan", "--config", TINY, "--world-size", "1", "--hbm", "160KiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    m = re.match(
        r"dinrec plan: error: the dense side does not fit: it needs ([0-9.]+) (KiB|MiB) of HBM on every rank", err[0]
    )
    assert m and float(m.group(1)) * {"KiB": 1, "MiB": 1024}[m.group(2)] > 160, err[0]
    assert err[0].endswith("a smaller --batch-size or more HBM per rank")


def test_dense_side_estimate_counts_parameters_and_the_saved_activations():
    """Against closed forms on the tiny DIN: parameters x (param, grad, DDP bucket, Adam's two
    moments); activations at least the attention unit's per-behaviour input [B, T, 2 x 16]
    ([e, e ⊙ v]) in float32, which its first matmul keeps for the backward, and linear in the
    batch size."""
    from trainer.config import load_config
    from trainer.dense_memory import dense_memory

    cfg = load_config(TINY, [])
    a, b = dense_memory(cfg, 64), dense_memory(cfg, 128)
    width = 16  # item dim 8 + cate dim 8
    att = 4 * width * 16 + 16 + 16 + 16 * 1 + 1  # Linear(64, 16), Dice alpha, Linear(16, 1)
    mlp_in = 2 * width + 4  # candidate, attention-pooled history, user (dim 4)
    mlp = mlp_in * 32 + 32 + 32 + 32 * 16 + 16 + 16 + 16 * 1 + 1  # Linear, Dice, Linear, Dice, Linear
    assert a["parameters"] == (att + mlp) * 4 * 5
    t = cfg.data.max_hist_len
    assert a["activations"] >= 64 * t * 2 * width * 4
    assert b["activations"] == pytest.approx(2 * a["activations"], rel=0.02)


def test_billion_row_config_plans_for_64_gpus_within_their_memory(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "--config",
                str(ROOT / "configs/billion.yaml"),
                "--world-size",
                "64",
                "--hbm",
                "80GiB",
                "--local-world-size",
                "8",
                "--out",
                str(plan),
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(plan.read_text())
    assert doc["tables"]["item"]["sharding_type"] in ("row_wise", "table_row_wise")
    assert len(doc["ranks"]) == 64
    assert all(0 < r["hbm_bytes"] <= parse_size("80GiB") for r in doc["ranks"])
    # every row of the billion-row table is placed exactly once
    assert sum(s["sizes"][0] for s in doc["tables"]["item"]["shards"]) == 1_000_000_000


def test_parse_size():
    assert parse_size("80GiB") == 80 * 2**30 and parse_size("512GB") == 512 * 10**9 and parse_size("1024") == 1024
    with pytest.raises(ConfigError, match="expected a number with an optional unit"):
        parse_size("lots")

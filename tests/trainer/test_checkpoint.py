"""Checkpoints, exact resume and fault tolerance.

The reference of every resumed or restarted run is the same config run without interruption: its
final checkpoint must hold bit-identical tensors (tables, fused optimizer state with MBA counts
and Adagrad sums, dense tower, Dice statistics, dense Adam state, random generator states).
Faults are real: the worker process is SIGKILLed at a step or in the middle of a checkpoint write
(trainer/faults.py), or its loss is made NaN.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.cli import main
from tests.conftest import ROOT, free_port, tiny_argv
from trainer import checkpoint
from trainer.data import stream_from_config

BIN = Path(sys.executable).parent
# row-wise Adagrad + MBA with online counts (per-row optimizer state), id dropout (a generator),
# Dice (running statistics), Adam (dense optimizer state); 2 epochs, a checkpoint every 5 steps
RUN = [
    "sparse_optimizer.type=rowwise_adagrad_mba",
    "sparse_optimizer.lambda=0.01",
    "sparse_optimizer.counts=online",
    "model.id_dropout=0.1",
    "train.checkpoint_every=5",
    "train.keep_checkpoints=0",
]
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def args(tiny_data, out, *extra):
    return tiny_argv(tiny_data, out, *RUN, *extra)


def dinrec(argv, fault=None, ranks=1, max_restarts=0):
    """`dinrec` in a subprocess (under torchrun for ranks > 1); returns the CompletedProcess."""
    env = {**ENV, **({"DINREC_FAULT": fault} if fault else {})}
    if ranks == 1:
        cmd = [sys.executable, "-m", "launch.cli", *argv]
    else:
        cmd = [
            str(BIN / "torchrun"),
            f"--nproc_per_node={ranks}",
            f"--master_port={free_port()}",
            f"--max-restarts={max_restarts}",
            "-m",
            "launch.cli",
            *argv,
        ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def result(p) -> dict:
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([x for x in p.stdout.splitlines() if x.startswith("{")][-1])


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = checkpoint.read_tensors(a), checkpoint.read_tensors(b)
    assert ta.keys() == tb.keys()
    assert any(k.startswith("sparse_optimizer.") for k in ta) and any(k.startswith("dense_optimizer.") for k in ta)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, differ


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The uninterrupted runs: one process, and two ranks under torchrun."""
    base = tmp_path_factory.mktemp("reference")
    one = result(dinrec(["train", *args(tiny_data, base / "one")]))
    two = result(dinrec(["train", *args(tiny_data, base / "two")], ranks=2))
    return {"one": (base / "one", one), "two": (base / "two", two)}


def test_stream_resumes_at_any_batch(tiny_cfg):
    """Batch k of an epoch is the same whether the epoch is read from 0 or from any start <= k,
    on 1 rank and on 2."""
    cfg = tiny_cfg("data.batch_size=50")
    for world in (1, 2):
        for rank in range(world):
            s = stream_from_config(cfg, "train", rank, world)
            full = list(s.epoch(1))
            for k in (1, 5, len(full) - 1, len(full)):
                part = list(s.epoch(1, k))
                assert len(part) == len(full) - k
                for a, b in zip(part, full[k:], strict=True):
                    assert torch.equal(a.labels, b.labels) and torch.equal(a.sparse.values(), b.sparse.values())
            for k in (3, len(full) - 1):  # the recorded position is where batch k's first row comes from
                pos = s.position(1, k)
                order = list(s._order(1)).index(s._unit_id[(pos["file"], pos["row_group"])])
                chunk = s._read_unit(pos["file"], pos["row_group"], 1, order)
                assert chunk.scalars["user_id"][pos["row_offset"]] == full[k].users[0]


@pytest.mark.multiprocess
def test_resume_after_kill_equals_the_uninterrupted_run(tiny_data, tmp_path, reference):
    out = tmp_path / "killed"
    p = dinrec(["train", *args(tiny_data, out)], fault="kill:0:12")
    assert p.returncode == -9
    assert [Path(c).name for c in checkpoint.list_checkpoints(out / "checkpoints")] == [
        "step-000000005",
        "step-000000010",
    ]
    resumed = result(dinrec(["train", *args(tiny_data, out), "--resume"]))
    ref_dir, ref = reference["one"]
    assert_identical(ref_dir / "checkpoints" / "step-000000066", out / "checkpoints" / "step-000000066")
    assert {k: resumed[k] for k in ("auc", "gauc", "logloss")} == {k: ref[k] for k in ("auc", "gauc", "logloss")}
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("resumed_from")] == [10]


@pytest.mark.multiprocess
def test_adam_mba_resumes_with_its_step_count(tiny_data, tmp_path):
    """Lazy Adam's bias corrections count the updates so far: a run killed at step 12 and resumed
    from step 10 ends with the uninterrupted run's tensors (m, v and n_j included) only if the
    resumed optimizer continues at t = 11, not at t = 1."""
    adam = ["sparse_optimizer.type=adam_mba", "sparse_optimizer.lr=0.01", "train.epochs=1"]
    ref = tmp_path / "reference"
    result(dinrec(["train", *args(tiny_data, ref), *adam]))
    out = tmp_path / "killed"
    assert dinrec(["train", *args(tiny_data, out), *adam], fault="kill:0:12").returncode == -9
    result(dinrec(["train", *args(tiny_data, out), *adam, "--resume"]))
    last = checkpoint.list_checkpoints(ref / "checkpoints")[-1]
    assert Path(last).name == Path(checkpoint.list_checkpoints(out / "checkpoints")[-1]).name
    assert any(k.endswith("exp_avg_sq") for k in checkpoint.read_tensors(Path(last)))
    assert_identical(Path(last), Path(checkpoint.list_checkpoints(out / "checkpoints")[-1]))


@pytest.mark.multiprocess
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tiny_data, tmp_path, reference, capsys):
    out = tmp_path / "torn"
    p = dinrec(["train", *args(tiny_data, out)], fault="checkpoint:0:10")
    assert p.returncode == -9
    ckpts = out / "checkpoints"
    torn = ckpts / "step-000000010"  # its shards are written, its manifest (written last) is not
    assert (torn / "__0_0.distcp").is_file() and not (torn / "manifest.json").exists()
    assert Path(checkpoint.latest(ckpts)).name == "step-000000005"
    assert main(["eval", "--checkpoint", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["checkpoint"].endswith("step-000000005")
    assert main(["eval", "--checkpoint", str(torn), "--no-progress"]) == 2
    assert "incomplete checkpoint" in capsys.readouterr().err
    (torn / "__0_0.distcp").write_bytes(b"torn")  # what the next save must not keep
    result(dinrec(["train", *args(tiny_data, out), "--resume", "latest"]))
    checkpoint.verify(torn)  # the next save removed the torn write and wrote step 10 anew
    assert_identical(reference["one"][0] / "checkpoints" / "step-000000066", ckpts / "step-000000066")


@pytest.mark.multiprocess
def test_torchrun_restarts_after_a_killed_rank_and_ends_with_the_same_weights(tiny_data, tmp_path, reference):
    out = tmp_path / "restarted"
    r = result(dinrec(["train", *args(tiny_data, out)], fault="kill:1:12", ranks=2, max_restarts=1))
    ref_dir, ref = reference["two"]
    final = f"step-{ref['steps']:09d}"
    assert_identical(ref_dir / "checkpoints" / final, out / "checkpoints" / final)
    assert r["auc"] == ref["auc"] and r["logloss"] == ref["logloss"]


@pytest.mark.multiprocess
@pytest.mark.ray
def test_ray_restart_skips_a_damaged_newest_checkpoint(tiny_data, tmp_path, reference, capsys):
    """A Ray Train worker SIGKILLed mid-epoch: FailureConfig restarts the group, which resumes from
    the run's newest sound checkpoint. Rank 0 flips a byte of the newest checkpoint (step 10) and is
    SIGKILLed: the restarted group skips it for step 5, says so on stderr and in metrics.jsonl,
    rewrites step 10, and ends with the weights of the uninterrupted 2-rank run. (A killed rank 1
    restarts under torchrun below and on the two-node cluster in tests/launch/test_cluster.py.)"""
    out = tmp_path / "ray_damaged"
    os.environ["DINREC_FAULT"] = "damage:0:12"
    try:
        argv = ["train", *args(tiny_data, out), "launch.launcher=ray", "launch.workers=2", "launch.max_failures=1"]
        assert main(argv) == 0
    finally:
        del os.environ["DINREC_FAULT"]
    captured = capsys.readouterr()
    r = json.loads(captured.out.splitlines()[-1])
    assert (out / ".fault-damage-0-12").exists()  # the fault fired
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    segments = [x for x in log if "segment" in x]
    assert len(segments) == 2 and segments[1]["resumed_from"].endswith("step-000000005")
    damaged = str(out / "checkpoints" / "step-000000010")
    assert [s["checkpoint"] for s in segments[1]["skipped_checkpoints"]] == [damaged]
    assert captured.err.count("dinrec: skipped the damaged checkpoint") == 1
    checkpoint.verify(out / "checkpoints" / "step-000000010")  # written again
    ref_dir, ref = reference["two"]
    final = f"step-{ref['steps']:09d}"
    assert_identical(ref_dir / "checkpoints" / final, out / "checkpoints" / final)
    assert r["auc"] == ref["auc"]


@pytest.mark.multiprocess
def test_reshard_two_to_one_and_one_to_two_give_the_same_eval(tiny_data, reference, capsys):
    (two_dir, two), (one_dir, one) = reference["two"], reference["one"]
    assert main(["eval", "--checkpoint", str(two_dir), "--no-progress"]) == 0  # 2 -> 1
    e = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert e["samples"] == two["samples"]
    assert e["auc"] == pytest.approx(two["auc"], abs=1e-5) and e["logloss"] == pytest.approx(two["logloss"], abs=1e-5)
    e = result(dinrec(["eval", "--checkpoint", str(one_dir), "--no-progress"], ranks=2))  # 1 -> 2
    assert e["auc"] == pytest.approx(one["auc"], abs=1e-5) and e["logloss"] == pytest.approx(one["logloss"], abs=1e-5)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_a_mid_epoch_checkpoint_resumes_on_another_world_size(tiny_data, tmp_path, reference):
    """2 -> 1 and 1 -> 2 after batch 5 of epoch 0: the tables reshard, the rows of the epoch not
    yet trained are split over the new ranks (tests/trainer/test_data.py checks, row by row, that
    each is trained exactly once), the global batch follows the new world size, and the log and
    stderr say so."""
    for src, wrote, ranks in (("two", 2, 1), ("one", 1, 2)):
        ref_dir, ref = reference[src]
        out = tmp_path / f"{src}_on_{ranks}"
        p = dinrec(
            ["train", *args(tiny_data, out), "--resume", str(ref_dir / "checkpoints" / "step-000000005")], ranks=ranks
        )
        r = result(p)
        assert f"dinrec: resuming epoch 0 of a {wrote}-rank checkpoint on {ranks} rank(s)" in p.stderr
        log = records(out)
        resplit = [x for x in log if "segment" in x][-1]["resplit"]
        assert (resplit["from_world_size"], resplit["world_size"], resplit["global_batch"]) == (
            wrote,
            ranks,
            ranks * 64,
        )
        epoch0 = next(x for x in log if x.get("epoch") == 0 and "rows_per_rank" in x)
        assert epoch0["earlier_segments"] == [[wrote, 5]] and len(epoch0["rows_per_rank"]) == ranks
        rows_per_epoch = ref["train_samples"] // 2
        assert epoch0["first_samples"] == 5 * 64 * wrote  # trained before the checkpoint
        assert (
            epoch0["first_samples"] + sum(epoch0["rows_per_rank"])
            == rows_per_epoch
            == resplit["rows_left"] + 5 * 64 * wrote
        )
        assert r["train_samples"] == ref["train_samples"]  # both epochs, every row once


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    monkeypatch.setenv("DINREC_FAULT", "nan:0:8")
    assert main(["train", *args(tiny_data, out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # the guard reads its flags at the checkpoint of step 10, before writing it
    assert err[-1] == (
        f"dinrec train: error: non-finite training loss at step 8 (epoch 0, batch 7), found at step 10: stopped; "
        f"no checkpoint holds its update; last good checkpoint: {out / 'checkpoints' / 'step-000000005'}"
    )
    assert [Path(c).name for c in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-000000005"]
    ok = checkpoint.read_tensors(out / "checkpoints" / "step-000000005")
    assert all(torch.isfinite(t).all() for t in ok.values() if t.is_floating_point())


def test_nan_loss_is_found_within_log_every_steps(tiny_data, tmp_path, monkeypatch, capsys):
    """The guard's bound: a non-finite loss at step 8 is found at the next log step (9 with
    train.log_every=3), before the checkpoint of step 10 could be written."""
    out = tmp_path / "nan3"
    monkeypatch.setenv("DINREC_FAULT", "nan:0:8")
    assert main(["train", *args(tiny_data, out), "train.log_every=3", "train.checkpoint_every=5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite training loss at step 8 (epoch 0, batch 7), found at step 9: stopped" in err
    assert err.endswith(str(out / "checkpoints" / "step-000000005"))
    assert [Path(c).name for c in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-000000005"]
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == [3, 6]  # the log line of step 9 is not written


@pytest.mark.ray
def test_nan_under_ray_stops_without_a_restart(tiny_data, tmp_path, monkeypatch, capsys):
    """All ranks stop at the NaN step together and report it as an answer: Ray does not restart
    the group (were it restarted, the fault, which fires once, would not recur and the run would
    end with status 0)."""
    out = tmp_path / "nan_ray"
    monkeypatch.setenv("DINREC_FAULT", "nan:0:8")
    assert (
        main(["train", *args(tiny_data, out), "launch.launcher=ray", "launch.workers=2", "launch.max_failures=1"]) == 1
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dinrec train: error: non-finite training loss at step 8 (epoch 0, batch 7)")
    assert [Path(c).name for c in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-000000005"]


@pytest.mark.multiprocess
def test_refusals_are_one_line(tiny_data, tmp_path, reference, capsys):
    one_dir, _ = reference["one"]
    # a fresh run into a directory with another run's checkpoints
    assert main(["train", *args(tiny_data, one_dir)]) == 2
    assert "holds the checkpoints of an earlier run (newest: step-000000066)" in capsys.readouterr().err
    # a checkpoint of another config
    assert main(["train", *args(tiny_data, tmp_path / "x"), "--resume", str(one_dir), "dense_optimizer.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "checkpoint of another config: dense_optimizer.lr: 0.001 in the checkpoint, 0.5 now" in err
    # the reference kept every checkpoint (keep_checkpoints=0); the default keeps the newest 3
    assert len(checkpoint.list_checkpoints(one_dir / "checkpoints")) == 15
    assert main(["train", *args(tiny_data, tmp_path / "k"), "train.keep_checkpoints=3", "train.epochs=1"]) == 0
    assert [Path(c).name for c in checkpoint.list_checkpoints(tmp_path / "k" / "checkpoints")] == [
        "step-000000025",
        "step-000000030",
        "step-000000033",
    ]


def test_relative_and_absolute_data_paths_are_the_same_config(tiny_cfg, monkeypatch, tmp_path):
    """The Ray launcher makes data paths absolute, the others keep the config's: a checkpoint of
    one resumes under the other (the other resume direction of the elastic check in docs)."""
    monkeypatch.chdir(tmp_path)
    rel, absolute = tiny_cfg("data.train=d/train"), tiny_cfg(f"data.train={tmp_path / 'd' / 'train'}")
    assert checkpoint.config_fingerprint(rel) == checkpoint.config_fingerprint(absolute)
    assert checkpoint.config_fingerprint(rel) != checkpoint.config_fingerprint(tiny_cfg("data.train=e/train"))

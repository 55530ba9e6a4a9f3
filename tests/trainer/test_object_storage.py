"""Click logs and run directories on an object store: an S3-compatible server (moto) started on
127.0.0.1 by the tests, reached through the standard AWS environment only.

Training from s3:// click logs into an s3:// out_dir, resuming from the mid-run checkpoint there
and evaluating from it give the metrics of the same runs on local files to the last digit; a
partial checkpoint (no manifest) is ignored and cleaned; bad buckets, credentials, endpoints and
checkpoints are one line and exit 2 within a bounded time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from launch.cli import main
from tests.conftest import ROOT, free_port, make_bucket, upload
from trainer import checkpoint, storage

RUN = ["train.epochs=2", "train.limit_batches=6", "train.checkpoint_every=4", "train.keep_checkpoints=0"]
METRICS = ("auc", "gauc", "logloss", "samples", "steps", "train_samples")


def train(capsys, data_train: str, data_test: str, out: str, *extra: str) -> dict:
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--no-progress"]
    argv += [f"data.train={data_train}", f"data.test={data_test}", f"train.out_dir={out}", *RUN, *extra]
    assert main(["train", *argv]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def same(a: dict, b: dict) -> None:
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}


@pytest.fixture(scope="module")
def s3_data(s3_server, tiny_data):
    return upload(tiny_data, make_bucket("clicks") + "/tiny")


def test_storage_layer_on_s3(s3_server):
    base = make_bucket("layer") + "/a"
    storage.write_text(storage.join(base, "x", "one.txt"), "1")
    storage.write_text(storage.join(base, "x", "two.parquet"), "2")
    assert storage.files(storage.join(base, "x")) == [f"{base}/x/one.txt", f"{base}/x/two.parquet"]
    assert storage.files(f"{base}/x/*.parquet") == [f"{base}/x/two.parquet"]
    assert storage.is_dir(f"{base}/x") and storage.is_file(f"{base}/x/one.txt") and not storage.exists(f"{base}/y")
    assert storage.sizes(base, recursive=True) == {"x/one.txt": 1, "x/two.parquet": 1}
    with storage.AppendLog(f"{base}/log", every_s=3600) as log:
        log.write("a\n")
        assert not storage.exists(f"{base}/log")  # buffered: an object store has no append
        log.sync()
        assert storage.read_text(f"{base}/log") == "a\n"
        log.write("b\n")
    with storage.AppendLog(f"{base}/log") as log:  # a resumed run continues the log
        log.write("c\n")
    assert storage.read_text(f"{base}/log") == "a\nb\nc\n"
    assert storage.read_from(f"{base}/log", 2) == b"b\nc\n"
    storage.remove_tree(f"{base}/x")
    assert storage.files(f"{base}/x") == []


def test_train_resume_eval_on_s3_match_local_files(capsys, s3_data, tiny_data, tmp_path):
    local = train(capsys, str(tiny_data / "train"), str(tiny_data / "test"), str(tmp_path / "local"))
    out = make_bucket("runs") + "/din"
    remote = train(capsys, f"{s3_data}/train", f"{s3_data}/test/*.parquet", out)
    same(remote, local)
    names = [storage.name(c) for c in checkpoint.list_checkpoints(f"{out}/checkpoints")]
    assert names == ["step-000000004", "step-000000006", "step-000000008", "step-000000012"]
    assert remote["checkpoint"] == f"{out}/checkpoints/step-000000012"
    records = [json.loads(line) for line in storage.read_text(f"{out}/metrics.jsonl").splitlines()]
    assert records[-1]["eval"]["auc"] == local["auc"]  # the log is complete on the store

    # resumed from the mid-epoch checkpoint on the store, into another s3 run directory
    mid = f"{out}/checkpoints/step-000000004"
    resumed = train(
        capsys, f"{s3_data}/train", f"{s3_data}/test/*.parquet", make_bucket("resumed") + "/din", "--resume", mid
    )
    same(resumed, local)

    # evaluated from the store
    assert main(["eval", "--checkpoint", out, "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: evaluated[k] for k in ("auc", "gauc", "logloss")} == {k: local[k] for k in ("auc", "gauc", "logloss")}
    assert evaluated["checkpoint"] == f"{out}/checkpoints/step-000000012"


def test_a_partial_checkpoint_on_s3_is_ignored_then_cleaned(capsys, s3_data):
    out = make_bucket("partial") + "/din"
    train(capsys, f"{s3_data}/train", f"{s3_data}/test", out, "train.epochs=1")
    ckpts = checkpoint.list_checkpoints(f"{out}/checkpoints")
    storage.remove(f"{ckpts[-1]}/manifest.json")  # as a crash between the shards and the manifest leaves it
    assert checkpoint.list_checkpoints(f"{out}/checkpoints") == ckpts[:-1]
    assert main(["eval", "--checkpoint", ckpts[-1], "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"dinrec eval: error: {ckpts[-1]}: incomplete checkpoint (no manifest.json: its write did not finish)"
    ]
    train(capsys, f"{s3_data}/train", f"{s3_data}/test", out, "train.epochs=1", "--resume", "latest")
    assert not storage.exists(f"{ckpts[-1]}/__0_0.distcp") or storage.exists(f"{ckpts[-1]}/manifest.json")


def dinrec(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *argv],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_bad_buckets_credentials_endpoints_and_checkpoints_are_one_line(s3_data, tiny_data, tmp_path):
    base = ["--config", str(ROOT / "configs/tiny.yaml"), "--no-progress", f"train.out_dir={tmp_path / 'o'}"]
    line = one_error_line(dinrec("train", *base, "data.train=s3://no-such-bucket/train", f"data.test={s3_data}/test"))
    assert line == "dinrec train: error: s3://no-such-bucket/train: no such bucket (s3://no-such-bucket)"
    line = one_error_line(dinrec("train", *base, f"data.train={s3_data}/nothing-here", f"data.test={s3_data}/test"))
    assert line == f"dinrec train: error: {s3_data}/nothing-here: no Parquet files found"
    line = one_error_line(dinrec("eval", "--checkpoint", f"{s3_data}/not-a-run", "--no-progress"))
    assert line.startswith(f"dinrec eval: error: {s3_data}/not-a-run: no dinrec checkpoint there")

    t0 = time.monotonic()
    closed = f"http://127.0.0.1:{free_port()}"
    p = dinrec(
        "train", *base, f"data.train={s3_data}/train", f"data.test={s3_data}/test", env={"AWS_ENDPOINT_URL": closed}
    )
    line = one_error_line(p)
    assert line == (
        f"dinrec train: error: {s3_data}/train: endpoint unreachable, endpoint {closed} "
        "(after 3 attempts, 5 s connect / 30 s request timeout)"
    )
    assert time.monotonic() - t0 < 90


def test_wrong_credentials_are_one_line(tmp_path):
    """A second server that checks credentials (moto with authentication on): the session's test
    keys are unknown to it."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        p = dinrec(
            "train",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "data.train=s3://clicks/train",
            f"train.out_dir={tmp_path / 'o'}",
            env={
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "wrong",
                "AWS_SECRET_ACCESS_KEY": "x",
            },
        )
        line = one_error_line(p)
        assert line.startswith("dinrec train: error: s3://clicks/train: ") and "AWS_ACCESS_KEY_ID" in line, line
    finally:
        server.terminate()
        server.wait()


def test_bench_loader_reads_the_s3_copy_in_the_same_run(s3_data, tiny_data):
    from tools.bench import bench_loader
    from trainer.config import load_config

    cfg = load_config(
        ROOT / "configs/tiny.yaml", [f"data.train={tiny_data / 'train'}", f"data.test={tiny_data / 'test'}"]
    )
    r = bench_loader(cfg, batches=20, train_steps=3, compare=f"{s3_data}/train")
    assert r["compare_samples"] == r["loader_samples"] == 20 * 64
    assert r["compare_samples_per_s"] > 0 and r["compare_over_loader"] > 0

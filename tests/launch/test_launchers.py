"""The launchers run the one worker function: local Ray (`dinrec train`) and torchrun (`ray job
submit` to a two-node cluster: tests/launch/test_cluster.py); a failing worker is one line naming
its rank."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch.cli import main
from tests.conftest import ROOT, listeners, outward, tiny_argv, torchrun

BIN = Path(sys.executable).parent
TEST_ROWS = 900  # tiny data: 300 users x 3 test impressions


tiny_args = tiny_argv


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


class Listening:
    """The listening TCP sockets opened while the block runs, polled 5 times a second: `new`, and
    `outward` (those on an address other than loopback)."""

    def __enter__(self):
        self.before, self.new, self.outward, self.done = listeners(), set(), set(), threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self) -> None:
        while not self.done.wait(0.2):
            now = listeners()
            self.new |= now - self.before
            self.outward |= set(outward(self.before, now))

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


@pytest.mark.ray
def test_local_ray_two_workers(tiny_data, tmp_path, capsys):
    """Two local Ray workers train and evaluate exactly (every model's 2 ranks = 1 rank is
    tests/trainer/test_distributed.py's check, on the same worker function)."""
    args = tiny_args(tiny_data, tmp_path / "r", "launch.launcher=ray", "launch.workers=2", "model.name=din")
    with Listening() as seen:
        assert main(["train", *args]) == 0
    assert seen.new and not seen.outward  # every server of the run (Ray's, torch's store, gloo's) on loopback
    r = last_json(capsys.readouterr().out)
    assert r["samples"] == TEST_ROWS  # exact eval over both ranks, padding removed
    assert r["model"] == "din" and 0 < r["auc"] < 1
    log = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    rows = next(r["rows_per_rank"] for r in log if "rows_per_rank" in r)
    assert len(rows) == 2 and sum(rows) == 2100
    cores = len(os.sched_getaffinity(0))
    assert r["torch_threads"] == [max(1, cores // 2)] * 2  # the machine's cores divided among the workers


@pytest.mark.ray
def test_local_ray_one_worker_computes_with_every_core(tiny_data, tmp_path, capsys):
    """launch.cpus_per_worker=0 (the default): one local worker gets all the machine's cores as
    torch threads, not Ray's one CPU per worker."""
    args = tiny_args(tiny_data, tmp_path / "r", "launch.launcher=ray", "launch.workers=1")
    assert main(["train", *args]) == 0
    assert last_json(capsys.readouterr().out)["torch_threads"] == [len(os.sched_getaffinity(0))]


def test_cpus_per_worker():
    from launch.ray_train import cpus_per_worker
    from trainer.config import ConfigError, load_config

    cores = len(os.sched_getaffinity(0))
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), ["launch.workers=1"])
    assert cpus_per_worker(cfg, None) == cores
    assert cpus_per_worker(cfg, "127.0.0.1:6379") == 1  # a cluster: one core each unless stated
    many = load_config(str(ROOT / "configs/tiny.yaml"), [f"launch.workers={cores + 1}"])
    assert cpus_per_worker(many, None) == 1
    three = load_config(str(ROOT / "configs/tiny.yaml"), ["launch.cpus_per_worker=3"])
    assert cpus_per_worker(three, None) == cpus_per_worker(three, "127.0.0.1:6379") == 3
    with pytest.raises(ConfigError, match="launch.cpus_per_worker: must be >= 0, got -1"):
        load_config(str(ROOT / "configs/tiny.yaml"), ["launch.cpus_per_worker=-1"])


@pytest.mark.ray
def test_local_ray_worker_failure_is_one_line_with_rank(tiny_data, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(tiny_data / "train" / "part-000.parquet", bad / "a.parquet")
    t = pq.read_table(tiny_data / "train" / "part-001.parquet")
    lab = t["label"].to_numpy().copy()
    lab[-1] = 5
    pq.write_table(t.set_column(0, "label", pa.array(lab)), bad / "x.parquet", row_group_size=100)
    args = tiny_args(tiny_data, tmp_path / "r", "launch.launcher=ray", "launch.workers=2", f"data.train={bad}")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # no worker traceback, no Ray failure dump
    assert err[0].startswith("dinrec train: error: worker rank ")
    assert "x.parquet: row group 6: column 'label': value 5 not in {0, 1}" in err[0]
    log = err[0].rsplit("(traceback: ", 1)[1].rstrip(")")
    assert "DataError" in (tmp_path / "r" / "logs" / Path(log).name).read_text()


@pytest.mark.multiprocess
def test_torchrun_two_processes(tiny_data, tmp_path):
    p = torchrun("launch.torchrun", *tiny_args(tiny_data, tmp_path / "t"))
    assert p.returncode == 0, p.stderr[-3000:]
    json_lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    assert len(json_lines) == 1  # rank 0 prints
    r = json.loads(json_lines[-1])
    assert r["samples"] == TEST_ROWS and "auc" in r
    assert list((tmp_path / "t" / "checkpoints").glob("step-*/manifest.json"))


@pytest.mark.multiprocess
def test_torchrun_an_error_every_rank_meets_is_printed_once(tiny_data, tmp_path):
    """Both ranks refuse the config; rank 0 says so (torchrun then adds its own failure summary)."""
    p = torchrun("launch.torchrun", *tiny_args(tiny_data, tmp_path / "t", "tables.0.dim=18"), timeout=300)
    assert p.returncode != 0
    ours = [x for x in p.stderr.splitlines() if x.startswith("dinrec train: error: ")]
    assert ours == [
        "dinrec train: error: tables.0.dim: 18: FBGEMM's embedding kernels take dims that are multiples of 4 (16 or 20)"
    ], p.stderr[-3000:]


@pytest.mark.parametrize("module", ["launch.ray_job", "launch.torchrun"])
def test_entry_points_have_help(module):
    p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and module in p.stdout


@pytest.mark.ray
def test_local_ray_listens_on_loopback_only():
    import ray

    from launch.ray_train import start_local_ray

    before = listeners()
    start_local_ray(2, {})
    try:
        assert ray.get(ray.remote(lambda: 1).remote()) == 1
        assert listeners() - before, "Ray started no listener?"
        assert not outward(before)
        assert ray.util.get_node_ip_address() == "127.0.0.1"
    finally:
        ray.shutdown()

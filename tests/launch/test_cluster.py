"""A Ray cluster of two nodes on this machine, click logs and the run directory on an S3 server
(moto) on 127.0.0.1: `ray job submit --working-dir` to the head runs 2 workers on different nodes;
the second node is killed mid-run (after a checkpoint) and a replacement joins: with
`launch.max_failures=1` the run comes back from the S3 checkpoint and ends with the weights and
metrics of the uninterrupted run of the same two ranks on one node (torchrun, local files).

Each node has one CPU; every server listens on 127.0.0.1 (tests/launch/ray_nodes.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, free_port, listeners, make_bucket, outward, torchrun, upload
from trainer import checkpoint, storage

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
RUN = ["train.epochs=2", "train.checkpoint_every=5", "train.keep_checkpoints=0", "launch.workers=2"]


class Cluster:
    """A head and extra nodes of one CPU each, every server on 127.0.0.1: started, killed and
    stopped by a helper process (tests/launch/ray_nodes.py, which says why not `ray start`)."""

    def __init__(self) -> None:
        self.port, self.dash = free_port(), free_port()
        self.base = Path("/tmp") / f"rc{self.port}"  # short: Ray's socket paths must stay under 107 bytes
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "PATH": f"{BIN}:{os.environ['PATH']}",
            # a lost node is noticed after 3 missed health checks a second apart (Ray's default: 5 × 3 s)
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.log = Path(f"{self.base}.log")
        self.nodes: subprocess.Popen | None = None

    def start(self, head: bool = False) -> int:
        """The head (first) or one more node; its index (the head is 0)."""
        if head:
            cmd = [sys.executable, "-m", "tests.launch.ray_nodes", str(self.base), str(self.port), str(self.dash)]
            with self.log.open("w") as log:
                pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": log, "text": True}
                self.nodes = subprocess.Popen(cmd, cwd=ROOT, env=self.env, **pipes)
            assert self.answer() == "ready"
            return 0
        return int(self.ask("add"))

    def kill(self, node: int) -> None:
        """SIGKILL every process of the node: a machine lost, as far as the cluster can tell."""
        assert self.ask(f"kill {node}") == "killed"

    def ask(self, command: str) -> str:
        self.nodes.stdin.write(command + "\n")
        self.nodes.stdin.flush()
        return self.answer()

    def answer(self) -> str:
        line = self.nodes.stdout.readline().strip()
        assert line, self.log.read_text()[-3000:]  # the helper ended
        return line

    def job(self, *args: str, env_vars: dict, wait: bool = True, submission_id: str | None = None):
        cmd = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{self.dash}", "--working-dir", str(ROOT)]
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        if submission_id:
            cmd += ["--submission-id", submission_id]
        if not wait:
            cmd += ["--no-wait"]
        cmd += ["--", "python", "-m", "launch.ray_job", *args]
        return subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=600)

    def job_cli(self, what: str, submission_id: str) -> str:
        cmd = [RAY, "job", what, "--address", f"http://127.0.0.1:{self.dash}", submission_id]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120).stdout

    def wait(self, submission_id: str, timeout: float) -> str:
        """The job's final status (SUCCEEDED, FAILED, STOPPED), polled through the job API (in a
        subprocess: Ray reads RAY_AUTH_MODE when it is imported)."""
        ask = (
            "from ray.job_submission import JobSubmissionClient as C; "
            f"print(C('http://127.0.0.1:{self.dash}').get_job_status('{submission_id}').value)"
        )
        deadline = time.monotonic() + timeout
        while True:
            p = subprocess.run([sys.executable, "-c", ask], env=self.env, capture_output=True, text=True, timeout=120)
            status = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            assert time.monotonic() < deadline, self.job_cli("logs", submission_id)[-3000:]
            time.sleep(2)

    def stop(self) -> None:
        if self.nodes is not None:
            try:
                self.nodes.communicate("stop\n", timeout=120)
            except subprocess.TimeoutExpired:
                self.nodes.kill()
        shutil.rmtree(self.base, ignore_errors=True)
        self.log.unlink(missing_ok=True)


def final_json(text: str) -> dict:
    lines = [x for x in text.splitlines() if x.startswith('{"auc"')]
    assert lines, text[-3000:]
    return json.loads(lines[-1])


def records(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(f"{uri}/metrics.jsonl").splitlines()]


def test_two_nodes_on_s3_then_a_node_lost_and_replaced(s3_server, tiny_data, tmp_path):
    data = upload(tiny_data, make_bucket("cluster-data") + "/tiny")
    runs = make_bucket("cluster-runs")
    config = ["--config", "configs/tiny.yaml", "--no-progress", f"data.train={data}/train", f"data.test={data}/test"]
    env_vars = {**s3_server, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}

    # the reference: the same two ranks uninterrupted under torchrun on this machine, local files
    ref_dir = tmp_path / "one_node"
    local = [f"data.train={tiny_data / 'train'}", f"data.test={tiny_data / 'test'}", f"train.out_dir={ref_dir}"]
    p = torchrun("launch.cli", "train", *config[:3], *local, *RUN, env=env_vars)
    one_node = final_json(p.stdout)

    cluster, before = Cluster(), listeners()
    try:
        cluster.start(head=True)
        second = cluster.start()
        # two workers on two nodes; the second node lost after the step-5 checkpoint, a replacement joining
        out = f"{runs}/lost"
        stall = {**env_vars, "DINREC_FAULT": "stall:1:7"}  # rank 1 waits after step 7: a known point to strike
        p = cluster.job(
            *config,
            f"train.out_dir={out}",
            *RUN,
            "launch.max_failures=1",
            env_vars=stall,
            wait=False,
            submission_id="lost",
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        deadline = time.monotonic() + 300
        while not storage.exists(f"{out}/.fault-stall-1-7"):
            assert time.monotonic() < deadline, cluster.job_cli("logs", "lost")[-3000:]
            time.sleep(0.5)
        assert [storage.name(c) for c in checkpoint.list_checkpoints(f"{out}/checkpoints")] == ["step-000000005"]
        assert not outward(before)  # the nodes, the job and its workers listen on 127.0.0.1 only
        cluster.kill(second)
        cluster.start()  # the replacement
        assert cluster.wait("lost", timeout=300) == "SUCCEEDED", cluster.job_cli("logs", "lost")[-3000:]
        lost = final_json(cluster.job_cli("logs", "lost"))
        segments = [r for r in records(out) if "segment" in r]
        assert len(segments) == 2 and segments[1]["resumed_from"] == f"{out}/checkpoints/step-000000005"
        first = segments[0]["nodes"]
        assert len(first) == 2 and first[0] != first[1], first  # Ray node ids: one worker per node
        assert segments[1]["nodes"] != first  # one of them is the replacement
        final = f"checkpoints/step-{one_node['steps']:09d}"
        a, b = checkpoint.read_tensors(ref_dir / final), checkpoint.read_tensors(f"{out}/{final}")
        assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
        assert {k: lost[k] for k in ("auc", "gauc", "logloss")} == {k: one_node[k] for k in ("auc", "gauc", "logloss")}
    finally:
        cluster.stop()


@pytest.mark.parametrize("name", ["kuberay-rayjob.yaml", "ray-cluster-aws.yaml"])
def test_the_deployment_examples_parse_and_keep_the_security_defaults(name):
    import yaml

    text = (ROOT / "deploy" / name).read_text()
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    assert "RAY_AUTH_MODE" in text and "token" in text  # token authentication for the job API
    assert "python -m launch.ray_job" in text and "train.out_dir=s3://" in text and "data.train=s3://" in text
    assert "AWS_SECRET_ACCESS_KEY=" not in text  # credentials never in a file of the repository
    if name == "ray-cluster-aws.yaml":
        starts = " ".join(doc["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in starts  # the job API on the head's loopback
    else:
        entry = doc["spec"]["entrypoint"]
        assert entry.startswith("python -m launch.ray_job --config configs/")

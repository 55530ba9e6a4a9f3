"""Shared fixtures and helpers: a tiny synthetic data set written once per session by the real
generator, a free loopback port, the CUDA skip, and a whole-model gather for comparing runs."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(users=300, items=500, cates=20, impressions_per_user=10, test_per_user=3, hist_max=30, min_hist=5, seed=3)

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# Triton kernels run on the CPU in Triton's interpreter (read when triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore")
logging.getLogger("torchrec").setLevel(logging.ERROR)

CUDA = pytest.mark.gpu  # skipped where torch sees no CUDA device (pytest_collection_modifyitems)


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listeners() -> set[tuple]:
    """(address, port) of every listening TCP socket on this machine, from /proc/net/tcp{,6}."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":
                continue
            hexip, port = local.split(":")
            raw = bytes.fromhex(hexip)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            out.add((getattr(ip, "ipv4_mapped", None) or ip, int(port, 16)))
    return out


def outward(before: set[tuple], now: set[tuple] | None = None) -> list[str]:
    """The listening sockets opened since `before` (until `now`, else until this call) on an
    address other than loopback."""
    return sorted(f"{a}:{p}" for a, p in (listeners() if now is None else now) - before if not a.is_loopback)


def torchrun(module: str, *argv: str, ranks: int = 2, env: dict | None = None, timeout: int = 600):
    """`torchrun --nproc_per_node=ranks -m module argv…` from the repository root, gloo on
    loopback, one thread per rank; the CompletedProcess."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [*cmd, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def tiny_argv(tiny_data: Path, out: Path, *extra: str) -> list[str]:
    """`dinrec train|eval` arguments for the tiny config on the session's data into `out`."""
    return [
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--no-progress",
        f"data.train={tiny_data / 'train'}",
        f"data.test={tiny_data / 'test'}",
        f"train.out_dir={out}",
        *extra,
    ]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a whole tensor on rank 0 (sharded tables gathered); a
    collective: all ranks call it, other ranks get {}."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            value = full
        elif hasattr(value, "full_tensor"):  # DTensor
            value = value.full_tensor()
        if rank == 0:
            out[key] = value.detach().clone()
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from tools.generate import WorldSpec, generate

    out = tmp_path_factory.mktemp("tiny")
    generate(WorldSpec(**TINY), out, train_files=3, test_files=2, row_group_size=256, progress=False)
    return out


def tiny_config_maker(data: Path, out: Path, *fixed: str):
    """A function of overrides -> the tiny config on `data`, writing under `out`, with `fixed`
    overrides first."""
    from trainer.config import load_config

    def make(*overrides: str):
        base = [f"data.train={data / 'train'}", f"data.test={data / 'test'}", f"train.out_dir={out / 'run'}"]
        return load_config(ROOT / "configs" / "tiny.yaml", [*base, *fixed, *overrides])

    return make


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path):
    """The tiny config pointed at the session's data and a fresh output directory."""
    return tiny_config_maker(tiny_data, tmp_path)


# The tiny world with the generator's profile and context features (tools.generate), and the
# tiny config's overrides that read them as MIAN's groups; every table 8 wide (the FM models).
ZOO_TABLES = (
    "tables=[{name: item, num_rows: 500, dim: 8, features: [item_id, hist_item_id]},"
    " {name: cate, num_rows: 20, dim: 8, features: [cate_id, hist_cate_id]},"
    " {name: user, num_rows: 1000, dim: 8, features: [user_id], id_map: hash},"
    " {name: gender, num_rows: 2, dim: 8, features: [gender]},"
    " {name: age, num_rows: 7, dim: 8, features: [age]},"
    " {name: occupation, num_rows: 21, dim: 8, features: [occupation]},"
    " {name: hour, num_rows: 24, dim: 8, features: [hour]},"
    " {name: weekday, num_rows: 7, dim: 8, features: [weekday]}]"
)
ZOO_GROUPS = ("data.profile=[gender, age, occupation]", "data.context=[hour, weekday]")


@pytest.fixture(scope="session")
def tiny_zoo_data(tmp_path_factory) -> Path:
    from tools.generate import WorldSpec, generate

    out = tmp_path_factory.mktemp("tiny_zoo")
    spec = WorldSpec(**TINY, profile=1.0, context=1.0)
    generate(spec, out, train_files=3, test_files=2, row_group_size=256, progress=False)
    return out


@pytest.fixture
def zoo_cfg(tiny_zoo_data, tmp_path):
    """The tiny config on the tiny world with profile and context features, read as groups."""
    return tiny_config_maker(tiny_zoo_data, tmp_path, ZOO_TABLES, *ZOO_GROUPS)


@pytest.fixture
def tiny_train_copy(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny training files, so that `count-features` writes its counts/
    into this test's directory."""
    data = tmp_path / "train"
    data.mkdir()
    for f in (tiny_data / "train").glob("*.parquet"):
        (data / f.name).write_bytes(f.read_bytes())
    return data


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on 127.0.0.1, and the standard AWS environment pointing
    at it for this session (tools.loader_s3.s3_on_loopback)."""
    from tools.loader_s3 import s3_on_loopback

    with s3_on_loopback() as env:
        yield env


def make_bucket(name: str) -> str:
    """A fresh bucket on the session's S3 server; its s3:// URI."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def upload(local: Path, uri: str) -> str:
    """Copy a local directory tree to `uri` (trainer.storage); returns `uri`."""
    from trainer import storage

    for f in sorted(local.rglob("*")):
        if f.is_file():
            storage.write_bytes(storage.join(uri, str(f.relative_to(local))), f.read_bytes())
    return uri


def compiled_for_the_gpu(*argv: str) -> subprocess.CompletedProcess:
    """`python argv…` from the project root without TRITON_INTERPRET: Triton's compiler and
    ptxas lower the kernels for a GPU, here without one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p

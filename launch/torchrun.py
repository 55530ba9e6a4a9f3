"""Entry point for torchrun, the same worker function without Ray:

    torchrun --nproc_per_node=N -m launch.torchrun --config C [key=value …]

torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) sets up the
process group: gloo on the CPU, NCCL with `launch.use_gpu=true`. Rank 0 prints the final JSON.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from launch import cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return cli.main(["train", "--help"])
    if "RANK" not in os.environ:
        print("launch.torchrun: error: run me under torchrun (RANK/WORLD_SIZE not set)", file=sys.stderr)
        return 2
    use_gpu = any(a.replace(" ", "") in ("launch.use_gpu=true", "launch.use_gpu=True") for a in argv)
    if os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost"):  # one machine: stay on loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("nccl" if use_gpu else "gloo")
    try:
        return cli.main(["train", *argv, "launch.launcher=local"])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

"""Entry point for torchrun, the same worker function without Ray:

    torchrun --nproc_per_node=N -m launch.torchrun --config C [key=value …]

torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) sets up the
process group: gloo on the CPU, NCCL with `launch.use_gpu=true`. Rank 0 prints the final JSON.
"""

from __future__ import annotations

import os
import sys

from launch import cli
from launch.process import exit_now


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return cli.main(["train", "--help"])
    if "RANK" not in os.environ:
        print("launch.torchrun: error: run me under torchrun (RANK/WORLD_SIZE not set)", file=sys.stderr)
        return 2
    # The worker makes its process group from torchrun's environment (trainer.sharding.process_group).
    return cli.main(["train", *argv, "launch.launcher=local"])


if __name__ == "__main__":
    exit_now(main())

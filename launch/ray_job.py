"""Entry point for an existing Ray cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m launch.ray_job --config C [key=value …]

The same as `dinrec train`, connected to the cluster (`ray.init(address="auto")`) instead of
starting a local Ray. Paths in the config are relative to the uploaded working directory.
"""

from __future__ import annotations

import sys

from launch import cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
    return cli.main(["train", *argv, "launch.launcher=ray", "launch.ray_address=auto"])


if __name__ == "__main__":
    sys.exit(main())

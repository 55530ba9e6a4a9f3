"""Entry point for an existing Ray cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m launch.ray_job --config C [key=value …]

The same as `dinrec train`, connected to the cluster (`ray.init(address="auto")`) instead of
starting a local Ray. Relative paths in the config are inside the uploaded working directory,
which leaves out what .gitignore lists (data/, runs/): on a cluster, give data.train, data.test
and train.out_dir as URIs every node reaches (s3://…, gs://…) or paths on a shared file system.
"""

from __future__ import annotations

import os
import sys

from launch import cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
    os.environ["DINREC_RAY_JOB"] = "1"  # a missing relative data path then says why
    return cli.main(["train", *argv, "launch.launcher=ray", "launch.ray_address=auto"])


if __name__ == "__main__":
    sys.exit(main())

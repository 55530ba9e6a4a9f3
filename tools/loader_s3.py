"""`dinrec bench loader` against object storage on this machine: an S3-compatible server (moto,
installed with the test extra) is started on 127.0.0.1, data.train is copied into a bucket there,
and the reader runs on the local files and on the s3:// copy in one run, each pinned to one core.

    python -m tools.loader_s3 --config configs/din_synthetic.yaml [--batches N] [key=value …]

The endpoint and credentials reach the reader through the standard AWS environment only, as on a
real store. Prints the bench's JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from tools.bench import bench_loader
from trainer import storage
from trainer.config import load_config
from trainer.data import resolve_paths


@contextmanager
def s3_on_loopback() -> Iterator[dict[str, str]]:
    """An S3-compatible server (moto) on 127.0.0.1, and the standard AWS environment pointing at
    it while the block runs (every client reads it from there: pyarrow, s3fs, boto3); yields
    that environment. The tests' S3 server too."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = dict(
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.loader_s3", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--batches", type=int, default=2000, help="batches read from each copy (default: %(default)s)")
    p.add_argument("--train-steps", type=int, default=100, help="training steps timed (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    import boto3

    with s3_on_loopback():
        boto3.client("s3").create_bucket(Bucket="bench")
        for path in resolve_paths(cfg.data.train):
            storage.write_bytes(f"s3://bench/train/{storage.name(path)}", storage.read_bytes(path))
        result = bench_loader(cfg, args.batches, args.train_steps, compare="s3://bench/train")
    result["s3_server"] = "moto (ThreadedMotoServer) on 127.0.0.1"
    return result


if __name__ == "__main__":
    print(json.dumps(main()))

"""The `dinrec` command: generate | train | eval | bench.

Every subcommand takes `--help`. User errors (bad config, bad data, bad flags) print one line on
stderr and exit with status 2, without a traceback. `train` and `eval` print one JSON object as
their last line of standard output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from trainer.config import ConfigError


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML experiment config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides with dotted keys, e.g. train.epochs=2 tables.0.dim=8")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinrec", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from tools import generate

    g = sub.add_parser("generate", help="write synthetic click logs (train/test Parquet)",
                       description=generate.__doc__.split("\n\n")[0])
    generate.add_arguments(g)

    t = sub.add_parser("train", help="train a config; last line: final metrics as JSON")
    _config_args(t)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the test set; last line: JSON")
    e.add_argument("--checkpoint", required=True, help="checkpoint directory written by train")
    _config_args(e, required=False)

    b = sub.add_parser("bench", help="benchmarks (JSON output)")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    from tools import bench

    bench.add_parsers(bsub, _config_args)
    return p


def _quiet() -> None:
    """Keep library chatter (planner tables, deprecation notes) off the user's terminal."""
    warnings.filterwarnings("ignore")
    for name in ("torchrec", "torch.distributed", "torch.fx", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet()
    from trainer.data import DataError

    try:
        result = _run(args)
    except (ConfigError, DataError) as e:
        print(f"dinrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


def _run(args: argparse.Namespace) -> dict | None:
    from trainer.config import load_config

    if args.command == "generate":
        from tools import generate

        return generate.run(args)
    if args.command == "train":
        from trainer.loop import train

        return train(load_config(args.config, args.overrides), progress=not args.no_progress)
    if args.command == "eval":
        from trainer import checkpoint
        from trainer.loop import evaluate_checkpoint

        base = None if args.config else checkpoint.read_config(args.checkpoint).to_dict()
        cfg = load_config(args.config, args.overrides, base=base)
        return evaluate_checkpoint(cfg, args.checkpoint, progress=not args.no_progress)
    if args.command == "bench":
        from tools import bench

        return bench.run(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

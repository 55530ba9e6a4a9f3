"""The `dinrec` command: generate | convert | count-features | plan | train | eval | bench | experiment.

Every subcommand takes `--help`. User errors (bad config, bad data, bad flags) print one line on
stderr and exit with status 2, without a traceback. `train` and `eval` print one JSON object as
their last line of standard output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from launch.process import exit_now, quiet_libraries
from tools import (
    bench,
    convert,
    deepctr_experiment,
    dien_experiment,
    generate,
    movielens_experiment,
    regularization,
    zoo_experiment,
)
from trainer.config import ConfigError, load_config

# Under torchrun: how long a rank other than 0 leaves rank 0 to report an error all ranks met
# (torchrun stops the waiting ranks as soon as rank 0 exits).
SHARED_ERROR_WAIT_S = 60


def _config_args(p: argparse.ArgumentParser, required: bool = True, baseline: bool = False) -> None:
    p.add_argument("--config", required=required, help="YAML experiment config")
    if baseline:
        p.add_argument(
            "--baseline",
            metavar="RUN_DIR",
            help="a finished run's out_dir: adds RelaImpr (DIN paper Eq. 11) against its AUC and GAUC",
        )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides with dotted keys, e.g. train.epochs=2 tables.0.dim=8",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (`dinrec plan: error: argument --world-size: invalid
    int value: 'abc' (dinrec plan --help)`), exit 2; subcommands inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="dinrec", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="write synthetic click logs (train/test Parquet)",
        description=generate.__doc__.split("\n\n")[0],
    )
    generate.add_arguments(g)

    convert.add_parser(sub)

    t = sub.add_parser("train", help="train a config; last line: final metrics as JSON")
    _config_args(t, baseline=True)
    t.add_argument(
        "--plan",
        metavar="PLAN_JSON",
        help="shard the tables by this plan file from `dinrec plan` "
        "(checked against the config and world size; default: plan on the fly)",
    )
    t.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="DIR|latest",
        help="continue from a checkpoint: 'latest' (the default) of train.out_dir, a checkpoint "
        "directory or a run directory; the same batches follow in the same order",
    )

    pl = sub.add_parser(
        "plan",
        help="plan the tables' sharding offline (torchrec planner, no GPU needed)",
        description="Runs torchrec's EmbeddingShardingPlanner on meta-device tables for a "
        "topology; prints per table and per rank, writes a plan file for `train --plan`.",
    )
    _config_args(pl)
    pl.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs or CPU workers)")
    pl.add_argument("--compute-device", choices=["cuda", "cpu"], default="cuda", help="(default: %(default)s)")
    pl.add_argument("--hbm", help="HBM per GPU, e.g. 80GiB (default: torchrec's)")
    pl.add_argument("--ddr", help="host memory per rank, e.g. 512GiB (default: torchrec's)")
    pl.add_argument("--local-world-size", type=int, help="ranks per host (default: torchrec's)")
    pl.add_argument("--batch-size", type=int, help="per-rank batch size (default: the config's data.batch_size)")
    pl.add_argument("--out", help="write the plan file here")
    pl.add_argument("--json", action="store_true", help="print only the JSON plan document")

    e = sub.add_parser("eval", help="evaluate a checkpoint on the test set; last line: JSON")
    e.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory written by train, or a run directory (train.out_dir: its newest checkpoint)",
    )
    e.add_argument(
        "--attention-plot",
        metavar="PNG",
        help="instead of the metrics: a PNG of one user's attention "
        "weights over their history for a few candidates (DIN, DIEN, MIAN)",
    )
    e.add_argument(
        "--user",
        type=int,
        help="with --attention-plot: the user_id (as in the data; default: the first test row with 8+ behaviours)",
    )
    e.add_argument("--candidates", type=int, default=4, help="with --attention-plot: candidates shown (default: 4)")
    _config_args(e, required=False, baseline=True)

    c = sub.add_parser("count-features", help="per-row sample counts n_j of every table (for MBA), next to the data")
    _config_args(c)

    b = sub.add_parser("bench", help="benchmarks (JSON output)")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    bench.add_parsers(bsub, _config_args)

    x = sub.add_parser("experiment", help="multi-seed experiments from the papers (JSON output)")
    xsub = x.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    regularization.add_parser(xsub, _config_args)
    deepctr_experiment.add_parser(xsub, _config_args)
    dien_experiment.add_parser(xsub, _config_args)
    movielens_experiment.add_parser(xsub, _config_args)
    zoo_experiment.add_parser(xsub, _config_args)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, KEY=VALUE overrides accepted anywhere after the command (argparse takes
    positionals in one run only), and `--resume KEY=VALUE` read as `--resume` then an override."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not os.path.exists(resume):
        args.overrides, args.resume = [*args.overrides, resume], "latest"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    quiet_libraries()
    # the layers below load torch, torchrec and Ray: imported here, not at the top, so that
    # `dinrec --help` and argument errors stay fast
    from launch.ray_train import WorkerFailed
    from trainer.data import DataError
    from trainer.loop import NonFiniteLoss

    try:
        result = _run(args)
        if getattr(args, "baseline", None) and result is not None:
            result.update(_rela_impr(result, args.baseline))
    except (ConfigError, DataError) as e:
        return _error(args, e, 2)
    except WorkerFailed as e:
        return _error(args, e, 2 if e.user_error else 1)
    except NonFiniteLoss as e:
        return _error(args, e, 1)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun every rank runs main(); rank 0 prints
    if result is not None and rank == 0:
        print(json.dumps(result), flush=True)
    return 0


def _error(args: argparse.Namespace, e: Exception, code: int) -> int:
    """One line on stderr, on a line of its own (open progress bars are closed first). Under
    torchrun every rank runs this: an error every rank meets alike (a config, the checks before
    training, rank 0's decisions) is printed by rank 0 only, while the other ranks wait for
    torchrun to stop them once rank 0 has exited; one found in a rank's own row groups is printed
    by that rank."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    if int(os.environ.get("RANK", "0")) == 0 or getattr(e, "rank_local", False):
        print(f"dinrec {args.command}: error: {e}", file=sys.stderr, flush=True)
    else:  # rank 0 says it: exiting first would have torchrun stop rank 0 before it can
        time.sleep(SHARED_ERROR_WAIT_S)
    return code


def _run(args: argparse.Namespace) -> dict | None:
    if args.command == "generate":
        return generate.run(args)
    if args.command == "plan":
        from embedding.plan import parse_size, print_plan
        from trainer.sharding import plan_for

        if args.world_size < 1:
            raise ConfigError(f"plan: --world-size must be >= 1, got {args.world_size}")
        cfg = load_config(args.config, args.overrides)
        doc = plan_for(
            cfg,
            args.world_size,
            args.compute_device,
            hbm=parse_size(args.hbm) if args.hbm else None,
            ddr=parse_size(args.ddr) if args.ddr else None,
            batch_size=args.batch_size,
            local_world_size=args.local_world_size,
        )
        if args.out:
            from trainer import storage

            storage.write_text(args.out, json.dumps(doc, indent=1))
        if args.json:
            return doc
        print_plan(doc)
        return {
            "plan": args.out,
            "world_size": doc["world_size"],
            "fingerprint": doc["fingerprint"],
            "max_hbm_bytes": max(r["hbm_bytes"] for r in doc["ranks"]),
            "max_ddr_bytes": max(r["ddr_bytes"] for r in doc["ranks"]),
        }
    if args.command == "train":
        # absolute: Ray workers may start in another directory
        from trainer import storage

        overrides = [*args.overrides, f"train.plan={storage.absolute(args.plan)}"] if args.plan else args.overrides
        if args.resume:
            resume = args.resume if args.resume == "latest" else storage.absolute(args.resume)
            overrides = [*overrides, f"train.resume={resume}"]
        from launch import launcher

        return launcher.run(load_config(args.config, overrides), progress=not args.no_progress)
    if args.command == "eval":
        from trainer import checkpoint
        from trainer.evaluate import evaluate_checkpoint

        base = None if args.config else checkpoint.read_config(args.checkpoint).to_dict()
        cfg = load_config(args.config, args.overrides, base=base)
        if args.attention_plot:
            from tools.attention_plot import attention_plot

            return attention_plot(cfg, args.checkpoint, Path(args.attention_plot), args.user, args.candidates)
        return evaluate_checkpoint(cfg, args.checkpoint, progress=not args.no_progress)
    if args.command == "convert":
        return convert.run(args)
    if args.command == "count-features":
        from trainer.counts import write_counts

        return write_counts(load_config(args.config, args.overrides), progress=not args.no_progress)
    if args.command == "bench":
        return bench.run(args)
    if args.command == "experiment":
        experiments = {
            "regularization": regularization,
            "deepctr": deepctr_experiment,
            "dien": dien_experiment,
            "movielens": movielens_experiment,
            "zoo": zoo_experiment,
        }
        return experiments[args.experiment].run(args)
    raise AssertionError(args.command)


def _rela_impr(result: dict, run_dir: str) -> dict:
    """RelaImpr of `result` against the final eval record of a finished run's metrics.jsonl."""
    from trainer import storage
    from trainer.metrics import rela_impr

    path = storage.join(run_dir, "metrics.jsonl")
    try:
        records = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    except (storage.StorageError, json.JSONDecodeError) as e:
        raise ConfigError(f"--baseline {run_dir}: cannot read {path} ({e})") from None
    evals = [r["eval"] for r in records if "eval" in r]
    if not evals:
        raise ConfigError(f"--baseline {run_dir}: {path} has no final eval record (unfinished run?)")
    base = evals[-1]
    return {
        "baseline": str(run_dir),
        "baseline_model": base.get("model"),
        "rela_impr_auc": round(rela_impr(result["auc"], base["auc"]), 3),
        "rela_impr_gauc": round(rela_impr(result["gauc"], base["gauc"]), 3),
    }


def entry() -> None:
    """The `dinrec` command (and `python -m launch.cli`): main(), then `exit_now` (launch.process)."""
    exit_now(main())


if __name__ == "__main__":
    entry()

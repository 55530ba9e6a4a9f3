"""`dinrec experiment regularization`: DIN paper §6.5 / Table 4 on synthetic data.

On a config set up to overfit (configs/mba_overfit.yaml), DIN is trained with each
regularization, for several seeds (parameter init and row order), testing after every epoch:

  none     the config's sparse optimizer (SGD or row-wise Adagrad), no regularization
  dropout  50 % of the behaviour ids of each training sample discarded (model.id_dropout)
  l2_all   plain L2 on all parameters: every row of every table at every step
           (sparse_optimizer.l2_all) and the dense tower (dense_optimizer.weight_decay)
  mba      mini-batch-aware L2 on the rows each batch touches (the same optimizer's *_mba type)

As in the paper's Table 4, a run is scored by its best test AUC over the epochs (with the logloss
of that epoch); the final epoch's figures are reported too. RelaImpr is against `none`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tools.experiments import fresh, mean_std, oracle_lines, parse_seeds, parse_variants, pm
from trainer.config import ConfigError, load_config
from trainer.metrics import rela_impr

VARIANTS = ("none", "dropout", "l2_all", "mba")


def add_parser(sub: argparse._SubParsersAction, config_args) -> None:
    p = sub.add_parser("regularization", help="DIN with no / dropout / plain L2 / MBA regularization, several seeds")
    config_args(p)
    p.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="(default: %(default)s)")
    p.add_argument("--lam", type=float, default=0.3, help="MBA λ (default: %(default)s)")
    p.add_argument("--l2", type=float, default=1e-3, help="plain L2 coefficient (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=0.5, help="id dropout probability (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write a Markdown table here (e.g. docs/results-mba.md)")


def variant_overrides(name: str, base_type: str, lam: float, l2: float, dropout: float) -> list[str]:
    """Config overrides of one variant; base_type is the config's sparse optimizer without MBA."""
    return {
        "none": [],
        "dropout": [f"model.id_dropout={dropout}"],
        "l2_all": [f"sparse_optimizer.l2_all={l2}", f"dense_optimizer.weight_decay={l2}"],
        "mba": [f"sparse_optimizer.type={base_type}_mba", f"sparse_optimizer.lambda={lam}"],
    }[name]


def score(result: dict) -> dict:
    epochs = result.get("epochs") or [{"epoch": 0, **result}]
    best = max(epochs, key=lambda e: e["auc"])
    return {
        "best_auc": best["auc"],
        "best_epoch": best["epoch"],
        "logloss_at_best": best["logloss"],
        "final_auc": epochs[-1]["auc"],
        "final_logloss": epochs[-1]["logloss"],
        "gauc_at_best": best["gauc"],
        "oracle_auc": result.get("oracle_auc"),
    }


def run(args: argparse.Namespace) -> dict:
    from launch import launcher  # loads torchrec and Ray: not at `dinrec --help`

    seeds = parse_seeds(args.seeds)
    variants = parse_variants(args.variants, VARIANTS)
    base = load_config(args.config, args.overrides)
    if base.sparse_optimizer.mba:
        raise ConfigError(
            f"{args.config}: sparse_optimizer.type must be the optimizer without MBA "
            f"(got {base.sparse_optimizer.type!r}); the experiment adds MBA for its mba runs"
        )
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    t0 = time.perf_counter()
    for seed in seeds:
        for v in variants:
            overrides = [
                *args.overrides,
                *variant_overrides(v, base.sparse_optimizer.type, args.lam, args.l2, args.dropout),
                f"train.seed={seed}",
                f"data.seed={seed}",
                "train.eval_every_epoch=true",
                f"train.out_dir={base.train.out_dir}/{v}_seed{seed}",
            ]
            result = launcher.run(fresh(load_config(args.config, overrides)))
            runs[v].append({"seed": seed, **score(result)})
            print(json.dumps({"variant": v, **runs[v][-1]}), flush=True)
    summary = {}
    for v, rs in runs.items():
        summary[v] = {
            k: mean_std([r[k] for r in rs])
            for k in ("best_auc", "logloss_at_best", "final_auc", "final_logloss", "gauc_at_best")
        }
    if "none" in summary:
        ref = summary["none"]["best_auc"][0]
        for v in summary:
            summary[v]["rela_impr_best_auc"] = rela_impr(summary[v]["best_auc"][0], ref)  # percent
    out = {
        "experiment": "regularization",
        "config": args.config,
        "overrides": args.overrides,
        "seeds": seeds,
        "lambda": args.lam,
        "l2": args.l2,
        "dropout": args.dropout,
        "epochs": base.train.epochs,
        "minutes": round((time.perf_counter() - t0) / 60, 1),
        "summary": summary,
        "runs": runs,
    }
    if args.out:
        Path(args.out).write_text(markdown(out))
    return out


def markdown(out: dict) -> str:
    cmd = (
        f"dinrec experiment regularization --config {out['config']} --seeds {','.join(map(str, out['seeds']))} "
        f"--lam {out['lambda']} --l2 {out['l2']} --dropout {out['dropout']}"
    )
    lines = [
        "# Regularization on a synthetic world set up to overfit (DIN paper §6.5, Table 4)",
        "",
        f"Regenerate: `{cmd}` ({out['minutes']} min on the machine that wrote this file). "
        f"{len(out['seeds'])} seeds (parameter init and row order), {out['epochs']} epochs, test after every "
        "epoch; best AUC over the epochs as in Table 4, mean ± std over seeds. RelaImpr against no regularization.",
        "",
        "| regularization | best test AUC | logloss at best | RelaImpr | final-epoch AUC | final-epoch logloss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    names = {
        "none": "none",
        "dropout": f"dropout (ids, p={out['dropout']})",
        "l2_all": f"plain L2 on all parameters ({out['l2']})",
        "mba": f"MBA (λ={out['lambda']})",
    }
    for v, s in out["summary"].items():
        ri = s.get("rela_impr_best_auc")
        lines.append(
            f"| {names[v]} | {pm(s['best_auc'])} | {pm(s['logloss_at_best'])} | "
            f"{'' if ri is None else f'{ri:+.1f} %'} | {pm(s['final_auc'])} | {pm(s['final_logloss'])} |"
        )
    lines += oracle_lines(out)
    return "\n".join(lines) + "\n"

"""`dinrec experiment dien`: DIEN paper §5 on synthetic data, through the configured launcher.

On a DIEN config (configs/dien_synthetic.yaml), for several seeds (parameter init and row order),
one run per variant on the same data:

  din                 DIN (the config with model.name=din)
  dien                DIEN: GRU + auxiliary loss and the config's evolution layer (the config as given)
  dien_no_aux         DIEN without the auxiliary loss (model.aux_loss=0)
  augru, agru, aigru  DIEN with that evolution layer (model.evolution=…); by default the two that
                      the config does not name

Test AUC, GAUC and logloss after the configured epochs, mean ± std over seeds, RelaImpr of the
AUC against DIN.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tools.experiments import fresh, mean_std, oracle_lines, parse_seeds, parse_variants, pm
from trainer.config import ConfigError, load_config
from trainer.metrics import rela_impr

EVOLUTIONS = ("augru", "agru", "aigru")
VARIANTS = {
    "din": ["model.name=din"],
    "dien": [],
    "dien_no_aux": ["model.aux_loss=0"],
    **{e: [f"model.evolution={e}"] for e in EVOLUTIONS},
}


def default_variants(evolution: str) -> list[str]:
    """DIN, the config's DIEN with and without L_aux, and the two evolution layers it does not name."""
    return ["din", "dien", "dien_no_aux", *(e for e in EVOLUTIONS if e != evolution)]


def names(evolution: str) -> dict[str, str]:
    """Table labels; `evolution` is the config's evolution layer."""
    e = evolution.upper()
    return {
        "din": "DIN",
        "dien": f"DIEN ({e}, auxiliary loss)",
        "dien_no_aux": f"DIEN ({e}) without auxiliary loss",
        **{v: f"DIEN with {v.upper()}" for v in EVOLUTIONS},
    }


def add_parser(sub: argparse._SubParsersAction, config_args) -> None:
    p = sub.add_parser("dien", help="DIN vs DIEN, with and without auxiliary loss, AUGRU/AGRU/AIGRU, several seeds")
    config_args(p)
    p.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (default: %(default)s)")
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated, of " + ",".join(VARIANTS) + " (default: din,dien,dien_no_aux and the two "
        "evolution layers the config does not name)",
    )
    p.add_argument("--out", default=None, help="also write a Markdown table here (e.g. docs/results-dien.md)")


def run(args: argparse.Namespace) -> dict:
    from launch import launcher  # loads torchrec and Ray: not at `dinrec --help`

    seeds = parse_seeds(args.seeds)
    base = load_config(args.config, args.overrides)
    if base.model.name != "dien":
        raise ConfigError(f"experiment dien: model.name must be dien, got {base.model.name}")
    variants = parse_variants(args.variants or ",".join(default_variants(base.model.evolution)), VARIANTS)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    t0 = time.perf_counter()
    for seed in seeds:
        for v in variants:
            overrides = [
                *args.overrides,
                *VARIANTS[v],
                f"train.seed={seed}",
                f"data.seed={seed}",
                f"train.out_dir={base.train.out_dir}/{v}_seed{seed}",
            ]
            r = launcher.run(fresh(load_config(args.config, overrides)))
            runs[v].append(
                {
                    "seed": seed,
                    **{k: r[k] for k in ("auc", "gauc", "logloss", "train_samples_per_s")},
                    "oracle_auc": r.get("oracle_auc"),
                }
            )
            print(json.dumps({"variant": v, **runs[v][-1]}), flush=True)
    summary = {
        v: {k: mean_std([r[k] for r in rs]) for k in ("auc", "gauc", "logloss", "train_samples_per_s")}
        for v, rs in runs.items()
    }
    if "din" in summary:
        for v in summary:
            summary[v]["rela_impr_auc"] = rela_impr(summary[v]["auc"][0], summary["din"]["auc"][0])
    out = {
        "experiment": "dien",
        "config": args.config,
        "overrides": args.overrides,
        "seeds": seeds,
        "evolution": base.model.evolution,
        "epochs": base.train.epochs,
        "launcher": base.launch.launcher,
        "workers": base.launch.workers,
        "minutes": round((time.perf_counter() - t0) / 60, 1),
        "summary": summary,
        "runs": runs,
    }
    if args.out:
        Path(args.out).write_text(markdown(out))
    return out


def markdown(out: dict) -> str:
    over = "".join(f" {o}" for o in out["overrides"])
    cmd = f"dinrec experiment dien --config {out['config']} --seeds {','.join(map(str, out['seeds']))}{over}"
    lines = [
        "# DIN vs DIEN on the synthetic click logs (DIEN paper §5, Table 2 / Table 5 design)",
        "",
        f"Regenerate: `{cmd}` ({out['minutes']} min on the machine that wrote this file). "
        f"{len(out['seeds'])} seeds (parameter init and row order), {out['epochs']} epoch(s), "
        f"{'one process' if out['launcher'] == 'local' else str(out['workers']) + ' Ray workers'}; test metrics after "
        "training, mean ± std over seeds. RelaImpr of the AUC against DIN. Training speed: `dinrec bench dien`.",
        "",
        "| model | test AUC | GAUC | logloss | RelaImpr vs DIN |",
        "| --- | --- | --- | --- | --- |",
    ]
    label = names(out["evolution"])
    for v, s in out["summary"].items():
        ri = s.get("rela_impr_auc")
        lines.append(
            f"| {label[v]} | {pm(s['auc'])} | {pm(s['gauc'])} | {pm(s['logloss'])} | "
            f"{'' if ri is None else f'{ri:+.1f} %'} |"
        )
    lines += oracle_lines(out)
    return "\n".join(lines) + "\n"

"""`dinrec experiment zoo`: every model of the zoo on one config, several seeds: the comparison
of the papers' tables (DIN Table 3, DIEN's, MIAN Table 2) on a user's own data.

Each model trains from the same config with only `model.name` changed (and the seeds: parameter
init and row order), then reports the test AUC, GAUC (DIN Eq. 10) and logloss, mean ± std over
seeds (after the last epoch; with data.valid, of the epoch whose validation GAUC is best: early
stopping chosen on held-out training users, never on the test set), RelaImpr (DIN Eq. 11) against
BaseModel, and training samples/s against DIN's. Writes a Markdown table and a bar plot of the
test AUC; states where the papers' ordering (LR < Wide&Deep < DeepFM < DIN < DIEN < MIAN) holds on
these data and where not.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tools.experiments import (
    add_common_arguments,
    figure,
    fresh,
    mean_std,
    oracle_lines,
    parse_seeds,
    parse_variants,
    pm,
    save_figure,
)
from trainer.config import ConfigError, load_config
from trainer.metrics import rela_impr

NAMES = {  # every model.name (trainer.models.MODELS, same order; not imported here: `dinrec --help` stays fast)
    "lr": "LR",
    "base": "BaseModel",
    "wide_deep": "Wide&Deep",
    "pnn": "PNN",
    "deepfm": "DeepFM",
    "dcn": "Deep&Cross",
    "xdeepfm": "xDeepFM",
    "din": "DIN",
    "dien": "DIEN",
    "mian": "MIAN",
}
PAPER_ORDER = ("lr", "wide_deep", "deepfm", "din", "dien", "mian")  # the MIAN paper's Table 2, worst to best


def add_parser(sub: argparse._SubParsersAction, config_args) -> None:
    p = sub.add_parser("zoo", help="every model of the zoo on one config, several seeds: table and plot")
    p.add_argument(
        "--config",
        default="configs/zoo_synthetic.yaml",
        help="the config of every model, or a pattern with {model} for one config per model, e.g. "
        "configs/zoo_movielens/{model}.yaml (default: %(default)s)",
    )
    p.add_argument("--models", default=",".join(NAMES), help="models, comma-separated (default: all)")
    add_common_arguments(p, "docs/results-zoo.md", "docs/zoo-synthetic.png", "runs/zoo")


def run(args: argparse.Namespace) -> dict:
    from launch import launcher  # loads torchrec and Ray: not at `dinrec --help`
    from trainer.data import resolve_paths

    seeds = parse_seeds(args.seeds)
    models = parse_variants(args.models, NAMES, "--models")
    configs = {m: config_of(args.config, m) for m in models}
    for m, path in configs.items():
        if not Path(path).is_file():
            raise ConfigError(f"experiment zoo: no config for model {m}: {path} does not exist")
    base_cfg = load_config(configs[models[0]], args.overrides)
    valid = bool(base_cfg.data.valid)  # then the test metrics of the epoch chosen on it
    for split in ("train", "test", *(("valid",) if valid else ())):  # one line if the data is not there
        resolve_paths(getattr(base_cfg.data, split))
    runs: dict[str, list[dict]] = {m: [] for m in models}
    t0 = time.perf_counter()
    for seed in seeds:
        for m in models:
            overrides = [
                *args.overrides,
                f"model.name={m}",
                f"train.seed={seed}",
                f"data.seed={seed}",
                f"train.out_dir={Path(args.runs) / f'{m}_seed{seed}'}",
                *(["train.eval_every_epoch=true"] if valid else []),
            ]
            r = launcher.run(fresh(load_config(configs[m], overrides)))
            runs[m].append({"seed": seed, **reported(r)})
            print(json.dumps({"model": m, **runs[m][-1]}), flush=True)
    columns = {"auc": "auc", "gauc": "gauc", "logloss": "logloss", "samples_per_s": "train_samples_per_s"}
    if valid:
        columns["valid_gauc"] = "valid_gauc"
    summary = {m: {k: mean_std([r[c] for r in rs]) for k, c in columns.items()} for m, rs in runs.items()}
    for m, s in summary.items():
        if valid:
            s["best_epochs"] = [r["best_epoch"] for r in runs[m]]
        if "base" in summary:
            s["rela_impr_auc"] = rela_impr(s["auc"][0], summary["base"]["auc"][0])
            s["rela_impr_gauc"] = rela_impr(s["gauc"][0], summary["base"]["gauc"][0])
        if "din" in summary:
            s["speed_vs_din"] = s["samples_per_s"][0] / summary["din"]["samples_per_s"][0]
    out = {
        "experiment": "zoo",
        "config": args.config,
        "data": base_cfg.data.train,
        "models": models,
        "seeds": seeds,
        "overrides": args.overrides,
        "epochs": base_cfg.train.epochs,
        "valid": base_cfg.data.valid,
        "batch_size": base_cfg.data.batch_size,
        "minutes": round((time.perf_counter() - t0) / 60, 1),
        "summary": summary,
        "ordering": ordering(summary),
        "model_configs": {
            m: {"config": configs[m], **learning_rates(load_config(configs[m], args.overrides))} for m in models
        },
        "runs": runs,
    }
    if args.plot:
        plot(out, Path(args.plot))
    if args.out:
        Path(args.out).write_text(markdown(out, args.plot))
    return out


def config_of(config: str, model: str) -> str:
    """The config of `model`: `config` itself, or with its `{model}` replaced by the model's name
    (one config per model, e.g. each with its own learning rates chosen on the validation set)."""
    return config.replace("{model}", model)


def learning_rates(cfg) -> dict:
    return {"sparse": f"{cfg.sparse_optimizer.type} lr {cfg.sparse_optimizer.lr:g}", "dense": cfg.dense_optimizer.lr}


def reported(r: dict) -> dict:
    """What one run contributes: the test metrics after the last epoch or, with data.valid, those
    of the epoch of the best validation GAUC (counted from 1 in `best_epoch`), never chosen on test."""
    keep = ("auc", "gauc", "logloss")
    out = {k: r[k] for k in ("train_samples_per_s", "oracle_auc") if k in r}
    if "best" not in r:
        return {**{k: r[k] for k in keep}, **out}
    best = r["best"]
    return {
        **{k: best["test"][k] for k in keep},
        "best_epoch": best["epoch"] + 1,
        "valid_gauc": best["valid"]["gauc"],
        **{f"last_epoch_{k}": r[k] for k in keep},
        **out,
    }


def ordering(summary: dict) -> list[dict]:
    """Each consecutive pair of the papers' ordering that was run: does it hold on the test AUC
    here, and by how much (the difference of the means, and the larger of the two stds)."""
    ran = [m for m in PAPER_ORDER if m in summary]
    pairs = []
    for lo, hi in zip(ran, ran[1:], strict=False):
        diff = summary[hi]["auc"][0] - summary[lo]["auc"][0]
        std = max(summary[hi]["auc"][1], summary[lo]["auc"][1])
        pairs.append(
            {"lower": lo, "higher": hi, "auc_difference": round(diff, 5), "std": round(std, 5), "holds": diff > 0}
        )
    return pairs


def plot(out: dict, path: Path) -> None:
    models = list(out["summary"])
    mean = [out["summary"][m]["auc"][0] for m in models]
    std = [out["summary"][m]["auc"][1] for m in models]
    fig, ax = figure((7.2, 4.0))
    ax.bar([NAMES[m] for m in models], mean, yerr=std, capsize=3, color="#4c72b0")
    lo = min(m - s for m, s in zip(mean, std, strict=True))
    hi = max(m + s for m, s in zip(mean, std, strict=True))
    ax.set_ylim(lo - 0.2 * (hi - lo) - 1e-3, hi + 0.2 * (hi - lo) + 1e-3)
    ax.set_ylabel("test AUC")
    ax.set_title(f"{Path(out['config']).name}: test AUC (mean ± std, {len(out['seeds'])} seeds)")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def markdown(out: dict, plot_path: str | None) -> str:
    over = "".join(f" {o}" for o in out["overrides"])
    subset = "" if list(out["models"]) == list(NAMES) else f" --models {','.join(out['models'])}"
    lines = [
        f"# The model zoo on `{out['config']}`",
        "",
        f"Regenerate: `dinrec experiment zoo --config {out['config']} "
        f"--seeds {','.join(map(str, out['seeds']))}{subset}{over}` "
        f"({out['minutes']} min on the machine that wrote this file). Data `{out['data']}`; batch "
        f"{out['batch_size']}, {out['epochs']} epoch(s), {len(out['seeds'])} seeds (init and row order), test "
        + (
            f"metrics at the epoch of the best validation GAUC (on `{out['valid']}`, users held out of the "
            "training set; the test set never chooses)"
            if out.get("valid")
            else "metrics after the last epoch"
        )
        + ", mean ± std over seeds; RelaImpr (DIN Eq. 11) against BaseModel; "
        "training samples/s (one process) against DIN's.",
        "",
    ]
    valid = bool(out.get("valid"))
    extra = " validation GAUC | best epoch (per seed) |" if valid else ""
    lines += [
        "| model | test AUC | test GAUC | logloss | RelaImpr AUC / GAUC |" + extra + " samples/s | speed vs DIN |",
        "| --- " * (7 + 2 * valid) + "|",
    ]
    for m, s in out["summary"].items():
        rel = f"{s['rela_impr_auc']:+.2f} % / {s['rela_impr_gauc']:+.2f} %" if "rela_impr_auc" in s else "–"
        speed = f"{s['speed_vs_din']:.2f}" if "speed_vs_din" in s else "–"
        chosen = f" {pm(s['valid_gauc'])} | {', '.join(map(str, s['best_epochs']))} |" if valid else ""
        lines.append(
            f"| {NAMES[m]} | {pm(s['auc'])} | {pm(s['gauc'])} | {pm(s['logloss'])} | {rel} |{chosen} "
            f"{s['samples_per_s'][0]:,.0f} | {speed} |"
        )
    per_model = {c["config"] for c in out["model_configs"].values()}
    if len(per_model) > 1:
        lines += ["", "Each model's config and learning rates:", ""]
        lines += [
            f"- {NAMES[m]}: `{c['config']}` ({c['sparse']}, dense lr {c['dense']:g})"
            for m, c in out["model_configs"].items()
        ]
    lines += oracle_lines(out)
    if out["ordering"]:
        held = [p for p in out["ordering"] if p["holds"]]
        broken = [p for p in out["ordering"] if not p["holds"]]
        lines += [
            "",
            "The papers' ordering (MIAN Table 2: LR < Wide&Deep < DeepFM < DIN < DIEN < MIAN), test AUC here:",
        ]
        for p in out["ordering"]:
            sign = "<" if p["holds"] else "≥"
            lines.append(
                f"- {NAMES[p['lower']]} {sign} {NAMES[p['higher']]}: difference {p['auc_difference']:+.4f} "
                f"(largest std {p['std']:.4f})"
            )
        lines += [
            "",
            f"{len(held)} of {len(out['ordering'])} steps hold"
            + (", see docs/models.md for why the others do not." if broken else "."),
        ]
    if plot_path:
        lines += ["", f"![test AUC per model]({Path(plot_path).name})"]
    return "\n".join(lines) + "\n"

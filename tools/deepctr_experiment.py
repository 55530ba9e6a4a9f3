"""`dinrec experiment deepctr`: DIN trained by DeepCTR-Torch and by dinrec on the same data, test
metrics after every epoch, several seeds: how dinrec's DIN compares in quality with the DIN
users of DeepCTR-Torch train (needs `make peers`, as `dinrec bench peers`).

The variants (rows of the table):
- deepctr: DeepCTR-Torch's `DIN` as its users run it, at its defaults: Adam (lr 0.001) on every
  parameter, the embeddings too (dense Adam: every row's moments decay at every step),
  embeddings drawn from N(0, 1e-4²), an L2 penalty of 1e-6 on every embedding row in the loss,
  the loss summed over the batch, ReLU in the MLP and Dice in the attention unit, scores not
  normalized. The config gives the shape (tables and their dims, the attention MLP and the MLP)
  and the batches: our reader's, in the same order as dinrec's (its own loader left out).
- dinrec: the config as it is (row-wise Adagrad on the embeddings by default).
- dinrec_adam: the config with lazy Adam on the embeddings (`sparse_optimizer.type=adam`, lr 0.001)
  and Adam at lr 0.001 on the dense side: DeepCTR's optimizer, where only the rows a batch touches
  are updated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tools.experiments import fresh, mean_std, parse_seeds, parse_variants, pm
from tools.peers import PEERS_DIR
from trainer.config import ConfigError, load_config

VARIANTS = {  # name -> (label, dinrec overrides; None: DeepCTR-Torch)
    "deepctr": ("DeepCTR-Torch DIN (its defaults: Adam on everything)", None),
    "dinrec": ("dinrec DIN (the config)", []),
    "dinrec_adam": (
        "dinrec DIN, lazy Adam on the embeddings",
        ["sparse_optimizer.type=adam", "sparse_optimizer.lr=0.001", "dense_optimizer.lr=0.001"],
    ),
}
METRICS = ("auc", "gauc", "logloss")


def add_parser(sub: argparse._SubParsersAction, config_args) -> None:
    p = sub.add_parser("deepctr", help="DIN by DeepCTR-Torch and by dinrec on the same data: test metrics per epoch")
    p.add_argument("--config", default="configs/movielens_din.yaml", help="the config (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of %(default)s (default: all)")
    p.add_argument("--peers-dir", default=str(PEERS_DIR), help="where `make peers` installed DeepCTR-Torch")
    p.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write a Markdown table here (e.g. docs/results-deepctr.md)")
    p.add_argument("--runs", default="runs/deepctr", help="dinrec's run directories (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")


def run(args: argparse.Namespace) -> dict:
    from launch import launcher
    from trainer.data import resolve_paths

    seeds = parse_seeds(args.seeds)
    variants = parse_variants(args.variants, VARIANTS)
    cfg = load_config(args.config, args.overrides)
    if cfg.model.name != "din":
        raise ConfigError(f"experiment deepctr: {args.config}: model.name is {cfg.model.name!r}; this compares DIN")
    for split in ("train", "test"):
        resolve_paths(getattr(cfg.data, split))
    peers = Path(args.peers_dir)
    if "deepctr" in variants and not (peers / "deepctr_torch").is_dir():
        raise ConfigError(f"experiment deepctr: DeepCTR-Torch is not installed in {peers}: run `make peers` first")
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in seeds:
        for v in variants:
            seeded = [*args.overrides, f"train.seed={seed}", f"data.seed={seed}"]
            extra = VARIANTS[v][1]
            if extra is None:
                epochs = _deepctr_child(args.config, seeded, peers)
            else:
                over = [
                    *seeded,
                    *extra,
                    "train.eval_every_epoch=true",
                    f"train.out_dir={Path(args.runs) / f'{v}_seed{seed}'}",
                ]
                r = launcher.run(fresh(load_config(args.config, over)))
                epochs = [{k: e[k] for k in METRICS} for e in r["epochs"]]
            runs[v].append({"seed": seed, "epochs": epochs})
            print(json.dumps({"variant": v, **runs[v][-1]}), flush=True)
    summary = {
        v: [{k: mean_std([r["epochs"][e][k] for r in rs]) for k in METRICS} for e in range(cfg.train.epochs)]
        for v, rs in runs.items()
    }
    out = {
        "experiment": "deepctr",
        "config": args.config,
        "overrides": args.overrides,
        "seeds": seeds,
        "epochs": cfg.train.epochs,
        "batch_size": cfg.data.batch_size,
        "minutes": round((time.perf_counter() - t0) / 60, 1),
        "summary": summary,
        "runs": runs,
    }
    if args.out:
        Path(args.out).write_text(markdown(out))
    return out


def markdown(out: dict) -> str:
    over = "".join(f" {o}" for o in out["overrides"])
    n = out["epochs"]
    lines = [
        "# DIN: DeepCTR-Torch against dinrec",
        "",
        f"Regenerate: `make peers && dinrec experiment deepctr --config {out['config']} "
        f"--seeds {','.join(map(str, out['seeds']))}{over}` ({out['minutes']} min on the machine that wrote "
        f"this file). Batch {out['batch_size']}, the same batches in the same order for every variant, "
        f"test metrics after each epoch, mean ± std over {len(out['seeds'])} seeds.",
        "",
        "| variant | "
        + " | ".join(f"test GAUC, epoch {e + 1}" for e in range(n))
        + " | test AUC, epoch 1 | logloss, epoch 1 |",
        "| --- " * (n + 3) + "|",
    ]
    for v, per_epoch in out["summary"].items():
        gaucs = " | ".join(pm(e["gauc"]) for e in per_epoch)
        lines.append(f"| {VARIANTS[v][0]} | {gaucs} | {pm(per_epoch[0]['auc'])} | {pm(per_epoch[0]['logloss'])} |")
    return "\n".join(lines) + "\n"


# --- DeepCTR-Torch's side, in its own process (only it sees .peers/) ------------------------------


def _deepctr_child(config: str, overrides: list[str], peers: Path) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(peers), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "tools.deepctr_experiment", "--config", config, *overrides]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"experiment deepctr: the DeepCTR-Torch process failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_deepctr(cfg) -> list[dict]:
    """DeepCTR-Torch's DIN at its defaults (see the module doc) over cfg's batches: the test
    metrics after every epoch."""
    import numpy as np
    import torch
    from deepctr_torch.inputs import build_input_features
    from deepctr_torch.models import DIN

    from embedding.layout import FeatureLayout
    from tools.peers import deepctr_columns, deepctr_inputs
    from trainer.data import stream_from_config
    from trainer.metrics import summarize

    if FeatureLayout.from_config(cfg).pooled_tables or cfg.data.dense_features:
        raise ConfigError("experiment deepctr: the config may only have the candidate and behaviour tables")
    torch.manual_seed(cfg.train.seed)
    layout = FeatureLayout.from_config(cfg)
    cols, names = deepctr_columns(layout, cfg)
    m = cfg.model
    net = DIN(
        cols,
        names,
        dnn_hidden_units=tuple(m.mlp),
        att_hidden_size=tuple(m.attention_mlp),
        att_weight_normalization=False,
        seed=cfg.train.seed,
        device="cpu",
    )
    net.compile("adam", "binary_crossentropy")
    index = build_input_features(cols)
    epochs = []
    for epoch in range(cfg.train.epochs):
        net.train()
        for b in stream_from_config(cfg, "train").epoch(epoch):  # the body of DeepCTR's BaseModel.fit loop
            y_pred = net(deepctr_inputs(b, index, layout.max_hist_len)).squeeze(-1)
            net.optim.zero_grad()
            loss = net.loss_func(y_pred, b.labels.float(), reduction="sum")
            (loss + net.get_regularization_loss() + net.aux_loss).backward()
            net.optim.step()
        net.eval()
        labels, probs, users = [], [], []
        with torch.no_grad():
            for b in stream_from_config(cfg, "test").epoch(0):
                probs.append(net(deepctr_inputs(b, index, layout.max_hist_len)).squeeze(-1).numpy())
                labels.append(b.labels.numpy())
                users.append(b.users.numpy())
        r = summarize(np.concatenate(labels), np.concatenate(probs), np.concatenate(users))
        epochs.append({k: float(r[k]) for k in METRICS})
    return epochs


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tools.deepctr_experiment", description="DeepCTR's side")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    print(json.dumps(train_deepctr(load_config(a.config, a.overrides))))


if __name__ == "__main__":
    main()

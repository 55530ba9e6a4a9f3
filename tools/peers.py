"""`dinrec bench peers`: dinrec's DIN (PReLU and Dice), DIEN and BaseModel training steps against
DeepCTR-Torch's same models, on the same batches of the config's training data, one process each.

DeepCTR-Torch is not a dependency of dinrec: `make peers` installs it (and scikit-learn, which it
imports) into `.peers/`, outside the virtual environment, and only the peer's process puts that
folder on its path. Both sides read the same batches from the Parquet files before the clock
starts; each process times `--steps` training steps after `--warmup` untimed ones, and the
parent runs dinrec's and DeepCTR's processes of each model in turn, `--rounds` times, so that a
change of the machine's speed during the run hits both alike.

What each side's step is:
- dinrec: the training step `dinrec train` runs (trainer.step.Steps: torchrec's pipeline, the
  fused sparse optimizer in the backward, the config's dense optimizer, precision and attention
  kernel).
- DeepCTR-Torch: the body of its `BaseModel.fit` loop (the float input matrix moved to the
  device, forward, summed binary cross-entropy, its regularisation and auxiliary losses,
  backward, `optim.step`) on input matrices built beforehand, with Adam on every parameter (its
  `compile("adam", "binary_crossentropy")`). Its data loader (a TensorDataset indexed row by
  row) is left out, so the comparison is of the steps alone.

The models, at the config's dims and hidden sizes:
- din_prelu / din_dice: DeepCTR `DIN` with that activation in the attention unit and the MLP,
  scores not normalised (as the paper); ours `model.name=din`. (DeepCTR's DIN gives its MLP a
  Dice for 3-d inputs, which fails on the MLP's [B, H]; the bench puts DeepCTR's own 2-d Dice
  there.)
- dien: DeepCTR `DIEN` with the config's evolution (AIGRU/AGRU/AUGRU), negative sampling and
  α = model.aux_loss, on the negatives our reader drew; ours `model.name=dien`.
- base: DeepCTR `WDL` with no wide part (embeddings, sum-pooled histories, MLP), the
  Embedding&MLP BaseModel; ours `model.name=base`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent.parent / ".peers"
MODELS = {  # name -> dinrec overrides
    "din_prelu": ["model.name=din", "model.activation=prelu"],
    "din_dice": ["model.name=din", "model.activation=dice"],
    "dien": ["model.name=dien"],
    "base": ["model.name=base", "model.activation=prelu"],
}


def add_parser(sub: argparse._SubParsersAction, config_args) -> None:
    p = sub.add_parser(
        "peers",
        help="dinrec's DIN, DIEN and BaseModel steps vs DeepCTR-Torch's (needs `make peers`), one process each",
    )
    config_args(p)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, of %(default)s (default: all)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per process (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="processes per side and model (default: %(default)s)")
    p.add_argument("--peers-dir", default=str(PEERS_DIR), help="where `make peers` installed DeepCTR-Torch")


def run(args: argparse.Namespace) -> dict:
    from tools.timing import machine
    from trainer.config import ConfigError, load_config

    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise ConfigError(f"bench peers: --models {args.models!r}: expected some of {','.join(MODELS)}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise ConfigError("bench peers: --steps and --rounds must be >= 1, --warmup >= 0")
    peers = Path(args.peers_dir)
    if not (peers / "deepctr_torch").is_dir():
        raise ConfigError(f"bench peers: DeepCTR-Torch is not installed in {peers}: run `make peers` first")
    cfg = load_config(args.config, args.overrides)  # fails here, once, on a bad config
    from embedding.layout import FeatureLayout

    if FeatureLayout.from_config(cfg).pooled_tables or cfg.data.dense_features:
        raise ConfigError(
            "bench peers: the peer models take candidate and behaviour tables only (no pooled tables, "
            "no dense features)"
        )
    results: dict[str, dict] = {m: {"dinrec": [], "deepctr": []} for m in models}
    for _ in range(args.rounds):
        for m in models:
            for side in ("dinrec", "deepctr"):
                results[m][side].append(_child(args, m, side, peers))
    out: dict = {
        "bench": "peers",
        **machine(),
        "batch_size": cfg.data.batch_size,
        "max_hist_len": cfg.data.max_hist_len,
        "dim": cfg.tables[0].dim,
        "attention_mlp": cfg.model.attention_mlp,
        "mlp": cfg.model.mlp,
        "precision": cfg.model.precision,
        "steps": args.steps,
        "rounds": args.rounds,
        "models": {},
    }
    for m, sides in results.items():
        rate = {s: _rate(rs) for s, rs in sides.items()}
        out["models"][m] = {
            "dinrec_samples_per_s": round(rate["dinrec"], 1),
            "deepctr_samples_per_s": round(rate["deepctr"], 1),
            "ratio_dinrec_over_deepctr": round(rate["dinrec"] / rate["deepctr"], 3),
            "ratio_per_round": [
                round(a["samples_per_s"] / b["samples_per_s"], 3)
                for a, b in zip(sides["dinrec"], sides["deepctr"], strict=True)
            ],
            "mean_hist_len": sides["dinrec"][0]["mean_hist_len"],
            # the first round's step against the GEMM rates at its own shapes (tools.timing.gemm_account)
            "dinrec_gemm": sides["dinrec"][0]["gemm"],
            "deepctr_gemm": sides["deepctr"][0]["gemm"],
        }
    return out


def _rate(runs: list[dict]) -> float:
    return sum(r["samples"] for r in runs) / sum(r["seconds"] for r in runs)


def _child(args: argparse.Namespace, model: str, side: str, peers: Path) -> dict:
    cmd = [sys.executable, "-m", "tools.peers", side, model, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.config:
        cmd += ["--config", args.config]
    cmd += list(args.overrides)
    env = dict(os.environ)
    if side == "deepctr":  # only the peer's process sees the peer's packages
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(peers), env.get("PYTHONPATH")) if p)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = ((proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"])[0]
        from trainer.config import ConfigError
        from trainer.data import DataError

        # the child's own one-line error on bad input stays one line here; anything else is a bug
        for kind in (DataError, ConfigError):
            name = f"{kind.__module__}.{kind.__name__}: "
            if tail.startswith(name):
                raise kind(f"bench peers: the {side} process of {model}: {tail[len(name) :]}")
        raise RuntimeError(f"bench peers: the {side} process of {model} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the children -------------------------------------------------------------------------------


def _batches(cfg, n: int) -> list:
    from tools.timing import take

    return take(cfg, n)


def _mean_hist(batches, layout) -> float:
    hist = layout.pairs[0][1]
    return round(sum(float(b.feature(hist).lengths().sum()) for b in batches) / sum(len(b) for b in batches), 2)


def _dinrec(cfg, steps: int, warmup: int) -> dict:
    import torch

    from embedding.layout import FeatureLayout
    from tools.timing import gemm_account, gemm_shapes, time_pipelined
    from trainer.sharding import build_model, dense_optimizer, process_group
    from trainer.step import Steps

    data = _batches(cfg, warmup + steps)
    with process_group(cfg) as (_, world):
        model = build_model(cfg, world, torch.device("cpu"))
        opt = dense_optimizer(cfg, model)
        rate = time_pipelined(model, opt, torch.device("cpu"), data, warmup)
        run = Steps(model, opt, torch.device("cpu")).run(iter(data[warmup:]))
        next(run)
        shapes = gemm_shapes(lambda: next(run))
    samples = sum(len(b) for b in data[warmup:])
    return {
        "samples": samples,
        "seconds": samples / rate,
        "samples_per_s": rate,
        "mean_hist_len": _mean_hist(data, FeatureLayout.from_config(cfg)),
        "gemm": gemm_account(shapes, len(data[warmup]) / rate),
    }


def deepctr_columns(layout, cfg, combiner: str = "mean") -> tuple[list, list[str]]:
    """DeepCTR-Torch feature columns of our layout: one SparseFeat per candidate feature, a
    VarLenSparseFeat per behaviour (and negative) feature sharing the candidate's table, one
    length column; and the candidate features' names (DeepCTR's `history_feature_list`)."""
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

    rows = {f: t.num_rows for t in cfg.tables for f in t.features}
    dims = {f: t.dim for t in cfg.tables for f in t.features}
    cols, names = [], []
    for cand, _ in layout.pairs:
        cols.append(SparseFeat(cand, vocabulary_size=rows[cand] + 1, embedding_dim=dims[cand]))
        names.append(cand)
    seq = [hist for _, hist in layout.pairs] + [neg for _, neg in layout.negatives]
    for (cand, _), feat in zip(layout.pairs * 2, seq, strict=False):
        shared = SparseFeat(feat, vocabulary_size=rows[cand] + 1, embedding_dim=dims[cand], embedding_name=cand)
        cols.append(VarLenSparseFeat(shared, maxlen=layout.max_hist_len, combiner=combiner, length_name="seq_length"))
    return cols, names


def deepctr_inputs(batch, feature_index: dict, max_len: int):
    """One Batch -> DeepCTR-Torch's float input matrix [B, columns] (its `fit` concatenates every
    feature into one float array): ids shifted by one (0 is DeepCTR's padding), histories padded
    to `max_len` with 0, and the lengths in `seq_length`."""
    import torch

    n = len(batch)
    width = max(end for _, end in feature_index.values())
    x = torch.zeros(n, width)
    lengths = None
    for name, (start, end) in feature_index.items():
        if name == "seq_length":
            continue
        jt = batch.feature(name)
        dense = jt.to_padded_dense(desired_length=end - start, padding_value=-1) + 1
        x[:, start:end] = dense.to(x.dtype)
        if end - start == max_len and lengths is None:
            lengths = jt.lengths()
    if "seq_length" in feature_index:
        start, _ = feature_index["seq_length"]
        x[:, start] = lengths.to(x.dtype)
    return x


def _deepctr(cfg, model: str, steps: int, warmup: int) -> dict:
    from deepctr_torch.inputs import build_input_features
    from deepctr_torch.models import DIEN, DIN, WDL

    from embedding.layout import FeatureLayout

    layout = FeatureLayout.from_config(cfg)
    data = _batches(cfg, warmup + steps)
    cols, names = deepctr_columns(layout, cfg, combiner="sum" if model == "base" else "mean")
    m = cfg.model
    act = {"prelu": "prelu", "dice": "dice"}[m.activation]
    kw = dict(dnn_hidden_units=tuple(m.mlp), l2_reg_embedding=0.0, seed=cfg.train.seed, device="cpu")
    if model.startswith("din"):
        net = DIN(
            cols,
            names,
            dnn_activation=act,
            att_hidden_size=tuple(m.attention_mlp),
            att_activation="Dice" if act == "dice" else act,
            att_weight_normalization=False,
            **kw,
        )
    elif model == "dien":
        net = DIEN(
            cols,
            names,
            gru_type=m.evolution.upper(),
            use_negsampling=m.aux_loss > 0,
            alpha=m.aux_loss,
            dnn_activation=act,
            att_hidden_units=tuple(m.attention_mlp),
            **kw,
        )
    else:
        net = WDL([], cols, dnn_activation=act, **kw)  # the histories sum-pooled (combiner "sum")
    if act == "dice":  # DeepCTR's DIN builds its MLP's Dice for 3-d inputs (fails on [B, H]): its own 2-d Dice
        from deepctr_torch.layers.activation import Dice

        layers = net.dnn.activation_layers
        for i, h in enumerate(m.mlp):
            layers[i] = Dice(h, dim=2)
    net.compile("adam", "binary_crossentropy")
    index = build_input_features(cols)
    xs = [deepctr_inputs(b, index, layout.max_hist_len) for b in data]
    ys = [b.labels.float() for b in data]

    def step(x, y) -> None:  # the body of DeepCTR-Torch's BaseModel.fit loop, without its metrics
        x, y = x.to(net.device).float(), y.to(net.device).float()
        y_pred = net(x).squeeze(-1)
        net.optim.zero_grad()
        loss = net.loss_func(y_pred, y, reduction="sum")
        total = loss + net.get_regularization_loss() + net.aux_loss
        loss.item()
        total.item()
        total.backward()
        net.optim.step()

    net.train()
    for x, y in zip(xs[:warmup], ys[:warmup], strict=True):
        step(x, y)
    t0 = time.perf_counter()
    for x, y in zip(xs[warmup:], ys[warmup:], strict=True):
        step(x, y)
    seconds = time.perf_counter() - t0
    samples = sum(len(b) for b in data[warmup:])
    from tools.timing import gemm_account, gemm_shapes

    shapes = gemm_shapes(lambda: step(xs[warmup], ys[warmup]))
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "mean_hist_len": _mean_hist(data, layout),
        "gemm": gemm_account(shapes, seconds * len(data[warmup]) / samples),
    }


def main() -> None:
    from trainer.config import load_config

    p = argparse.ArgumentParser(prog="python -m tools.peers", description="one side of `dinrec bench peers`")
    p.add_argument("side", choices=["dinrec", "deepctr"])
    p.add_argument("model", choices=list(MODELS))
    p.add_argument("--config")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    cfg = load_config(a.config, [*a.overrides, *MODELS[a.model]])
    r = _dinrec(cfg, a.steps, a.warmup) if a.side == "dinrec" else _deepctr(cfg, a.model, a.steps, a.warmup)
    print(json.dumps(r))


if __name__ == "__main__":
    main()

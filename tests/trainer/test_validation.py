"""data.valid: the validation set evaluated after every epoch, the best epoch by validation GAUC
named in the result and checkpointed under out_dir/best, where `dinrec eval` finds it."""

import json
from pathlib import Path

import numpy as np

from launch.cli import main


def test_best_epoch_by_validation_gauc_is_kept_and_evaluates_alike(tiny_cfg, tiny_data, capsys):
    from trainer.loop import train

    valid = tiny_data / "test"  # the tiny world has no valid/: its test split stands in (mechanics only)
    cfg = tiny_cfg(
        f"data.valid={valid}",
        "train.epochs=3",
        "train.eval_every_epoch=true",
        "train.keep_checkpoints=1",
        "sparse_optimizer.lr=2.0",  # learning rates that overfit: an earlier epoch is the best one
        "dense_optimizer.lr=0.05",
    )
    r = train(cfg, progress=False)
    epochs = r["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and all("valid" in e and "auc" in e for e in epochs)
    gaucs = [e["valid"]["gauc"] for e in epochs]
    best = r["best"]
    assert best["epoch"] == int(np.argmax(gaucs)) and best["valid"]["gauc"] == max(gaucs)
    assert best["epoch"] < 2  # not the last: what out_dir/best holds is not the final state
    assert best["test"]["gauc"] == epochs[best["epoch"]]["gauc"]  # the test metrics after that epoch
    assert epochs[-1]["auc"] == r["auc"]  # the last entry is the final evaluation
    out = Path(cfg.train.out_dir)
    assert len(list((out / "best" / "checkpoints").glob("step-*"))) == 1  # the best one only
    # the kept checkpoint is that epoch's state: evaluating it on the validation set gives its GAUC
    capsys.readouterr()
    args = ["--checkpoint", str(out / "best"), "--no-progress", f"data.test={valid}"]
    assert main(["eval", *args]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(got["gauc"] - best["valid"]["gauc"]) < 1e-6
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log if "eval" in x and "epoch" in x] == [0, 1]  # per-epoch lines before the last


def test_validation_without_per_epoch_test_metrics(tiny_cfg, tiny_data):
    from trainer.loop import train

    cfg = tiny_cfg(f"data.valid={tiny_data / 'test'}", "train.epochs=2")
    r = train(cfg, progress=False)
    assert [sorted(e) for e in r["epochs"]][0] == ["epoch", "valid"]  # no test set after epoch 0
    assert "valid" in r["epochs"][1] and "auc" in r["epochs"][1]
    assert r["best"]["epoch"] in (0, 1) and ("test" in r["best"]) == (r["best"]["epoch"] == 1)

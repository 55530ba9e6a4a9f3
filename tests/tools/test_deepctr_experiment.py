"""`dinrec experiment deepctr`: the dinrec variants are the runs `dinrec train` makes of the same
config (a plain training run as the reference), the table holds their means, the refusals are one
line; where `make peers` has installed DeepCTR-Torch, its side trains and is evaluated too."""

import json

import pytest

from launch.cli import main
from tests.conftest import ROOT
from tests.tools.test_bench import BEHAVIOUR_ONLY
from tools import peers


def _argv(tiny_data, tmp_path, *extra):
    return [
        "experiment",
        "deepctr",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--runs",
        str(tmp_path / "runs"),
        f"data.train={tiny_data / 'train'}",
        f"data.test={tiny_data / 'test'}",
        BEHAVIOUR_ONLY,
        "train.epochs=2",
        *extra,
    ]


def test_dinrec_variants_are_plain_training_runs(tiny_data, tmp_path, capsys):
    from trainer.config import load_config
    from trainer.loop import train

    md = tmp_path / "deepctr.md"
    argv = _argv(tiny_data, tmp_path, "--variants", "dinrec,dinrec_adam", "--seeds", "0,1", "--out", str(md))
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    over = [a for a in argv if "=" in a and not a.startswith("--")]
    ref = train(
        load_config(
            str(ROOT / "configs/tiny.yaml"),
            [*over, "train.seed=1", "data.seed=1", "train.eval_every_epoch=true", f"train.out_dir={tmp_path / 'ref'}"],
        ),
        progress=False,
    )
    got = out["runs"]["dinrec"][1]["epochs"]
    assert [e["gauc"] for e in got] == [e["gauc"] for e in ref["epochs"]] and len(got) == 2
    adam = out["runs"]["dinrec_adam"][0]["epochs"]
    assert adam != out["runs"]["dinrec"][0]["epochs"]  # another optimizer, other weights
    mean = sum(r["epochs"][0]["gauc"] for r in out["runs"]["dinrec"]) / 2
    text = md.read_text()
    assert f"| dinrec DIN (the config) | {mean:.4f} ± " in text and "test GAUC, epoch 2" in text


def test_refusals_are_one_line(tiny_data, tmp_path, capsys):
    assert main(_argv(tiny_data, tmp_path, "--peers-dir", str(tmp_path))) != 0
    assert "run `make peers` first" in capsys.readouterr().err
    assert main(_argv(tiny_data, tmp_path, "model.name=base")) != 0
    assert "this compares DIN" in capsys.readouterr().err


@pytest.mark.skipif(not (peers.PEERS_DIR / "deepctr_torch").is_dir(), reason="DeepCTR-Torch not installed")
def test_deepctr_side_trains_and_is_evaluated(tiny_data, tmp_path, capsys):
    assert main(_argv(tiny_data, tmp_path, "--variants", "deepctr", "--seeds", "0")) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run,) = out["runs"]["deepctr"]
    assert len(run["epochs"]) == 2 and all(0.5 < e["auc"] < 1 and e["logloss"] > 0 for e in run["epochs"])

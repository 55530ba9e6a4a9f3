"""`dinrec experiment regularization` end to end on the tiny data (figures are not asserted)."""

import json

from launch.cli import main
from tests.conftest import ROOT


def test_experiment_regularization_tiny(tiny_data, tmp_path, capsys):
    md = tmp_path / "table.md"
    args = ["experiment", "regularization", "--config", str(ROOT / "configs/tiny.yaml"), "--seeds", "0,1",
            "--variants", "none,mba", "--lam", "0.5", "--out", str(md),
            f"data.train={tiny_data / 'train'}", f"data.test={tiny_data / 'test'}",
            f"train.out_dir={tmp_path / 'runs'}", "sparse_optimizer.type=sgd", "train.epochs=2", "train.limit_batches=10"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["summary"]) == {"none", "mba"} and out["seeds"] == [0, 1]
    for v, runs in out["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert r["best_auc"] >= r["final_auc"] and r["best_epoch"] in (0, 1)
        mean, _ = out["summary"][v]["best_auc"]
        assert abs(mean - sum(r["best_auc"] for r in runs) / 2) < 1e-9
    assert out["summary"]["none"]["rela_impr_best_auc"] == 0.0
    text = md.read_text()
    assert "MBA (λ=0.5)" in text and "dinrec experiment regularization" in text
    # the runs really differ: MBA and plain L2 change the weights
    assert len({json.dumps(out["runs"][v][0]["final_auc"]) for v in out["runs"]}) > 1

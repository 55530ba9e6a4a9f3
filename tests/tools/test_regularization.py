"""`dinrec experiment regularization` end to end on the tiny data (figures are not asserted)."""

import json

import pytest

from launch.cli import main
from tests.conftest import ROOT


def test_experiment_regularization_tiny(tiny_data, tmp_path, capsys):
    md = tmp_path / "table.md"
    args = [
        "experiment",
        "regularization",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--seeds",
        "0,1",
        "--variants",
        "none,mba",
        "--lam",
        "0.5",
        "--out",
        str(md),
        f"data.train={tiny_data / 'train'}",
        f"data.test={tiny_data / 'test'}",
        f"train.out_dir={tmp_path / 'runs'}",
        "sparse_optimizer.type=sgd",
        "train.epochs=2",
        "train.limit_batches=10",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["summary"]) == {"none", "mba"} and out["seeds"] == [0, 1]
    for v, runs in out["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert r["best_auc"] >= r["final_auc"] and r["best_epoch"] in (0, 1)
        mean, _ = out["summary"][v]["best_auc"]
        assert abs(mean - sum(r["best_auc"] for r in runs) / 2) < 1e-9
    none, mba = out["summary"]["none"]["best_auc"][0], out["summary"]["mba"]["best_auc"][0]
    assert out["summary"]["mba"]["rela_impr_best_auc"] == pytest.approx(
        ((mba - 0.5) / (none - 0.5) - 1) * 100
    )  # Eq. 11
    text = md.read_text()
    assert "MBA (λ=0.5)" in text and "dinrec experiment regularization" in text
    # the runs really differ: MBA and plain L2 change the weights
    assert len({json.dumps(out["runs"][v][0]["final_auc"]) for v in out["runs"]}) > 1


def test_experiment_dien_runs_every_variant_and_writes_its_table(tiny_data, tmp_path, capsys):
    import json

    from launch.cli import main
    from tests.conftest import ROOT

    out = tmp_path / "dien.md"
    args = [
        "experiment",
        "dien",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--seeds",
        "0,1",
        "--variants",
        "din,dien,dien_no_aux",
        "--out",
        str(out),
        "model.name=dien",
        "train.epochs=1",
        f"data.train={tiny_data / 'train'}",
        f"data.test={tiny_data / 'test'}",
        f"train.out_dir={tmp_path / 'r'}",
    ]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(r["summary"]) == {"din", "dien", "dien_no_aux"} and r["seeds"] == [0, 1]
    assert all(len(v) == 2 for v in r["runs"].values())
    aucs = [x["auc"] for x in r["runs"]["dien"]]
    assert abs(r["summary"]["dien"]["auc"][0] - sum(aucs) / 2) < 1e-9
    din, dien = r["summary"]["din"]["auc"][0], r["summary"]["dien"]["auc"][0]
    assert r["summary"]["dien"]["rela_impr_auc"] == pytest.approx(((dien - 0.5) / (din - 0.5) - 1) * 100)  # Eq. 11
    assert r["runs"]["dien"][0]["auc"] != r["runs"]["dien_no_aux"][0]["auc"]  # the variants differ
    assert "| DIEN (AUGRU) without auxiliary loss |" in out.read_text()


def test_experiment_regularization_adds_mba_to_the_configs_optimizer(tiny_data, tmp_path, capsys):
    from tools.regularization import variant_overrides

    assert variant_overrides("mba", "rowwise_adagrad", 0.1, 0, 0) == [
        "sparse_optimizer.type=rowwise_adagrad_mba",
        "sparse_optimizer.lambda=0.1",
    ]
    assert variant_overrides("mba", "sgd", 0.1, 0, 0)[0] == "sparse_optimizer.type=sgd_mba"
    args = [
        "experiment",
        "regularization",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--seeds",
        "0",
        f"data.train={tiny_data / 'train'}",
        f"data.test={tiny_data / 'test'}",
        f"train.out_dir={tmp_path / 'runs'}",
        "sparse_optimizer.type=sgd_mba",
    ]
    assert main(args) == 2
    assert "sparse_optimizer.type must be the optimizer without MBA" in capsys.readouterr().err


def test_experiment_dien_default_variants_cover_every_evolution_layer_once():
    """By default the experiment runs DIN, the config's DIEN with and without the auxiliary loss, and
    the two evolution layers the config does not name: each of AUGRU, AGRU, AIGRU exactly once."""
    from tools.dien_experiment import VARIANTS, default_variants, names

    for evolution in ("augru", "agru", "aigru"):
        v = default_variants(evolution)
        assert v[:3] == ["din", "dien", "dien_no_aux"] and evolution not in v
        assert sorted([evolution, *v[3:]]) == ["agru", "aigru", "augru"]
        assert all(x in VARIANTS for x in v)
        assert names(evolution)["dien"] == f"DIEN ({evolution.upper()}, auxiliary loss)"

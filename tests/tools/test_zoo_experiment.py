"""`dinrec experiment zoo` end to end on the tiny world with profile and context features: every
model trains from one config with only model.name changed, and the table, the plot and the
ordering lines come from the runs."""

import json

from launch.cli import main
from tests.conftest import ROOT, ZOO_GROUPS, ZOO_TABLES
from trainer.models import MODELS


def test_experiment_zoo_runs_every_model_and_writes_table_and_plot(tiny_zoo_data, tmp_path, capsys):
    md, png = tmp_path / "zoo.md", tmp_path / "zoo.png"
    argv = [
        "experiment",
        "zoo",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--seeds",
        "0,1",
        "--out",
        str(md),
        "--plot",
        str(png),
        "--runs",
        str(tmp_path / "runs"),
        f"data.train={tiny_zoo_data / 'train'}",
        f"data.test={tiny_zoo_data / 'test'}",
        ZOO_TABLES,
        *ZOO_GROUPS,
        "train.epochs=1",
        "train.limit_batches=8",
    ]
    assert main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith('{"model"')]
    assert [x["model"] for x in lines] == list(MODELS) * 2  # every model, each seed
    text = md.read_text()
    assert "--models" not in text  # every model: the default
    for name in ("LR", "Wide&Deep", "PNN", "DeepFM", "Deep&Cross", "xDeepFM", "DIN", "DIEN", "MIAN"):
        assert f"| {name} |" in text
    assert "| BaseModel | " in text and "+0.00 % / +0.00 %" in text  # RelaImpr of BaseModel against itself
    assert "LR < Wide&Deep" in text or "LR ≥ Wide&Deep" in text  # the ordering lines, LR → MIAN
    assert "steps hold" in text
    assert png.stat().st_size > 1000
    # the table's DIN AUC is the mean of its two runs
    din = [x["auc"] for x in lines if x["model"] == "din"]
    assert f"| DIN | {sum(din) / 2:.4f} ± " in text


def test_the_experiments_model_names_are_the_zoos():
    from tools.zoo_experiment import NAMES

    assert list(NAMES) == list(MODELS)


def test_with_a_validation_set_the_table_reports_the_epoch_chosen_on_it(tiny_zoo_data, tmp_path, capsys):
    """With data.valid, each run's test metrics are those after the epoch of its best validation
    GAUC (read back here from the run's own metrics.jsonl), not after the last epoch."""
    md, runs = tmp_path / "zoo.md", tmp_path / "runs"
    argv = [
        "experiment",
        "zoo",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--models",
        "base,din",
        "--seeds",
        "0",
        "--out",
        str(md),
        "--plot",
        "",
        "--runs",
        str(runs),
        f"data.train={tiny_zoo_data / 'train'}",
        f"data.test={tiny_zoo_data / 'test'}",
        f"data.valid={tiny_zoo_data / 'test'}",  # the tiny world has no valid/: mechanics only
        ZOO_TABLES,
        *ZOO_GROUPS,
        "train.epochs=3",
        "sparse_optimizer.lr=2.0",  # learning rates that overfit: an earlier epoch can be the best
        "dense_optimizer.lr=0.05",
    ]
    assert main(argv) == 0
    lines = {x["model"]: x for x in map(json.loads, capsys.readouterr().out.splitlines()) if "model" in x}
    text = md.read_text()
    assert "best validation GAUC" in text and "| best epoch (per seed) |" in text
    assert "--seeds 0 --models base,din " in text  # the command that regenerates this table
    for m, name in (("base", "BaseModel"), ("din", "DIN")):
        log = [json.loads(x) for x in (runs / f"{m}_seed0" / "metrics.jsonl").read_text().splitlines()]
        epochs = [x["eval"]["epochs"] for x in log if "eval" in x and "epochs" in x["eval"]][-1]
        best = max(range(len(epochs)), key=lambda e: (epochs[e]["valid"]["gauc"], -e))
        assert lines[m]["best_epoch"] == best + 1 and lines[m]["auc"] == epochs[best]["auc"]
        assert lines[m]["last_epoch_auc"] == epochs[-1]["auc"]
        assert f"| {name} | {epochs[best]['auc']:.4f} ± 0.0000 |" in text

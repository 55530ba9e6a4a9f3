"""End to end through `dinrec` main(argv): generate -> train -> eval, help, one-line user errors."""

import json

import pyarrow.parquet as pq
import pytest

from launch.cli import main
from tests.conftest import ROOT


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_train_then_eval_tiny(tiny_cfg, tiny_data, tmp_path, capsys):
    out_dir = tmp_path / "run"
    args = [
        "train",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--no-progress",
        f"data.train={tiny_data / 'train'}",
        f"data.test={tiny_data / 'test'}",
        f"train.out_dir={out_dir}",
        "train.epochs=3",
    ]
    assert main(args) == 0
    result = last_json(capsys.readouterr().out)
    for key in ("model", "auc", "gauc", "logloss", "oracle_auc"):
        assert key in result
    assert result["model"] == "din" and 0.5 < result["oracle_auc"] < 1
    logged = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) >= 6
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the loss falls
    assert logged[-1]["eval"]["auc"] == result["auc"]
    # eval of the checkpoint reproduces the final metrics exactly
    assert main(["eval", "--checkpoint", str(out_dir), "--no-progress"]) == 0
    again = last_json(capsys.readouterr().out)
    for key in ("auc", "gauc", "logloss", "oracle_auc", "samples"):
        assert again[key] == result[key]
    # RelaImpr against a finished baseline run: Eq. 11 on the two final AUCs
    assert main(["eval", "--checkpoint", str(out_dir), "--no-progress", "--baseline", str(out_dir)]) == 0
    rel = last_json(capsys.readouterr().out)
    assert rel["rela_impr_auc"] == 0.0 and rel["baseline_model"] == "din"
    base = tmp_path / "fake_base"
    base.mkdir()
    (base / "metrics.jsonl").write_text(json.dumps({"eval": {"model": "base", "auc": 0.6, "gauc": 0.55}}) + "\n")
    assert main(["eval", "--checkpoint", str(out_dir), "--no-progress", "--baseline", str(base)]) == 0
    rel = last_json(capsys.readouterr().out)
    assert rel["rela_impr_auc"] == round(((result["auc"] - 0.5) / 0.1 - 1) * 100, 3)
    assert rel["rela_impr_gauc"] == round(((result["gauc"] - 0.5) / 0.05 - 1) * 100, 3)
    assert main(["eval", "--checkpoint", str(out_dir), "--no-progress", "--baseline", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cmd", [[], ["generate"], ["train"], ["eval"], ["bench"], ["bench", "loader"], ["bench", "train"]]
)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: dinrec" in capsys.readouterr().out


def test_user_errors_are_one_line_exit_2(tmp_path, tiny_data, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.yaml: cannot read config" in err
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "train.epocs=1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "dinrec train: error: train.epocs: unknown key (allowed: epochs, seed, out_dir, log_every, limit_batches, "
        "eval_every_epoch, plan, checkpoint_every, keep_checkpoints, resume)"
    )
    # bad data found while streaming (in the reader thread) still ends as one line, exit 2
    t = pq.read_table(tiny_data / "train" / "part-000.parquet")
    lab = t["label"].to_numpy().copy()
    lab[-1] = 3
    import pyarrow as pa

    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(t.set_column(0, "label", pa.array(lab)), bad / "x.parquet", row_group_size=100)
    code = main(
        [
            "train",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--no-progress",
            f"data.train={bad}",
            f"data.test={tiny_data / 'test'}",
            f"train.out_dir={tmp_path / 'o'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "x.parquet: row group" in err and "column 'label': value 3 not in {0, 1}" in err
    assert "Traceback" not in err


def test_generate_cli_rejects_bad_flags(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path), "--users", "0", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == "dinrec generate: error: generate: --users must be > 0"

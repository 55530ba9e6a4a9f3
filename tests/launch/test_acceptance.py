"""DIN against BaseModel and the oracle on generated data.

The default test runs a CI-sized version (150k training rows, about a minute on 2 cores); the
slow one is the issue's acceptance on the default data set (`pytest -m slow`, several minutes).
"""

import json

import pytest

from launch.cli import main
from tests.conftest import ROOT


def train(capsys, name, data, out, *overrides) -> dict:
    assert main(["train", "--config", str(ROOT / f"configs/{name}_synthetic.yaml"), "--no-progress",
                 f"data.train={data / 'train'}", f"data.test={data / 'test'}", f"train.out_dir={out}",
                 *overrides]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def compare(capsys, tmp_path, generate_args):
    data = tmp_path / "data"
    assert main(["generate", "--out", str(data), "--no-progress", *generate_args]) == 0
    capsys.readouterr()
    din = train(capsys, "din", data, tmp_path / "din")
    base = train(capsys, "base", data, tmp_path / "base")
    return din, base


def test_din_beats_base_model_ci_sized(tmp_path, capsys):
    din, base = compare(capsys, tmp_path, ["--users", "6000"])
    assert din["auc"] >= base["auc"] + 0.01, (din, base)
    assert din["gauc"] >= base["gauc"] + 0.01, (din, base)
    assert din["auc"] >= 0.90 * din["oracle_auc"], din


@pytest.mark.slow
def test_din_beats_base_model_and_nears_the_oracle_on_default_data(tmp_path, capsys):
    din, base = compare(capsys, tmp_path, [])
    assert din["auc"] >= base["auc"] + 0.01, (din, base)
    assert din["auc"] >= 0.97 * din["oracle_auc"], din

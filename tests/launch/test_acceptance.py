"""DIN against BaseModel and the oracle, and DIEN against DIN, on generated data.

Two worlds:
- the default one (`dinrec generate` defaults), where the clicks also depend on which of the
  history's categories the user still holds, which only the behaviours' order tells;
- the position-blind one (POSITION_BLIND flags: no such term, slower drift), where everything a
  click depends on is visible to a set of behaviours, so DIN can near the oracle.

The default tests run CI-sized versions (150k training rows); the slow ones run the default size
(`pytest -m slow`, several minutes each).
"""

import json

import pytest

from launch.cli import main
from tests.conftest import ROOT

POSITION_BLIND = ["--drift", "0.08", "--gamma", "2.0", "--current", "0", "--from-history", "0"]
CI_SIZE = ["--users", "6000"]


def train(capsys, name, data, out, *overrides) -> dict:
    assert main(["train", "--config", str(ROOT / f"configs/{name}_synthetic.yaml"), "--no-progress",
                 f"data.train={data / 'train'}", f"data.test={data / 'test'}", f"train.out_dir={out}",
                 *overrides]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def compare(capsys, tmp_path, generate_args, models=("din", "base")) -> dict[str, dict]:
    data = tmp_path / "data"
    assert main(["generate", "--out", str(data), "--no-progress", *generate_args]) == 0
    capsys.readouterr()
    return {m: train(capsys, m, data, tmp_path / m) for m in models}


def test_din_beats_base_model_and_nears_the_oracle_position_blind_ci_sized(tmp_path, capsys):
    r = compare(capsys, tmp_path, [*CI_SIZE, *POSITION_BLIND])
    din, base = r["din"], r["base"]
    assert din["auc"] >= base["auc"] + 0.01, (din, base)
    assert din["gauc"] >= base["gauc"] + 0.01, (din, base)
    assert din["auc"] >= 0.90 * din["oracle_auc"], din


def test_dien_beats_din_ci_sized(tmp_path, capsys):
    r = compare(capsys, tmp_path, CI_SIZE, ("din", "dien"))
    din, dien = r["din"], r["dien"]
    assert dien["auc"] >= din["auc"] + 0.01, (dien, din)


@pytest.mark.slow
def test_din_beats_base_model_and_nears_the_oracle_position_blind(tmp_path, capsys):
    r = compare(capsys, tmp_path, POSITION_BLIND)
    din, base = r["din"], r["base"]
    assert din["auc"] >= base["auc"] + 0.01, (din, base)
    assert din["auc"] >= 0.97 * din["oracle_auc"], din


@pytest.mark.slow
def test_dien_beats_din_beats_base_model_on_default_data(tmp_path, capsys):
    r = compare(capsys, tmp_path, [], ("din", "base", "dien"))
    din, base, dien = r["din"], r["base"], r["dien"]
    assert din["auc"] >= base["auc"] + 0.01, (din, base)
    assert dien["auc"] >= din["auc"] + 0.01, (dien, din)

"""DIN against BaseModel and the oracle, DIEN against DIN, and DIEN's auxiliary loss, on generated data.

Two worlds:
- the default one (`dinrec generate` defaults), where the clicks also depend on which of the
  history's categories the user still holds, which only the behaviours' order tells, and each
  user has long histories and few labelled impressions;
- the position-blind one (POSITION_BLIND flags: no such term, slower drift, 25 labelled
  impressions per user), where everything a click depends on is visible to a set of behaviours,
  so DIN can near the oracle.

The default tests run CI-sized versions (about 150k training rows) in one process (the local
launcher, with the global batch of the configs' two workers: 512 rows), which saves Ray's start of
about 25 s a run; the slow ones run the default size as users run it, two Ray workers (`pytest -m
slow`, several minutes each). That a one-process run trains what two workers train is
tests/trainer/test_distributed.py's check; Ray's launch is tests/launch/test_launchers.py's.
"""

import json

import pytest

from launch.cli import main
from tests.conftest import ROOT

POSITION_BLIND = [
    "--users",
    "40000",
    "--impressions-per-user",
    "30",
    "--test-per-user",
    "5",
    "--min-hist",
    "5",
    "--drift",
    "0.08",
    "--gamma",
    "2.0",
    "--current",
    "0",
    "--from-history",
    "0",
]
CI_POSITION_BLIND = [*POSITION_BLIND, "--users", "6000"]  # 150k training rows
CI_DEFAULT = ["--users", "18000"]  # 144k training rows
ONE_PROCESS = ("launch.launcher=local", "data.batch_size=512")  # the configs' 2 workers × 256 rows


def train(capsys, name, data, out, *overrides) -> dict:
    assert (
        main(
            [
                "train",
                "--config",
                str(ROOT / f"configs/{name}_synthetic.yaml"),
                "--no-progress",
                f"data.train={data / 'train'}",
                f"data.test={data / 'test'}",
                f"train.out_dir={out}",
                *overrides,
            ]
        )
        == 0
    )
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def compare(capsys, tmp_path, generate_args, models=("din", "base"), common=()) -> dict[str, dict]:
    """Train each of `models` on one generated world: a config name, or (label, name, overrides);
    `common`: overrides for every run."""
    data = tmp_path / "data"
    assert main(["generate", "--out", str(data), "--no-progress", *generate_args]) == 0
    capsys.readouterr()
    runs = [(m, m, ()) if isinstance(m, str) else m for m in models]
    return {label: train(capsys, name, data, tmp_path / label, *o, *common) for label, name, o in runs}


NO_AUX = ("dien_no_aux", "dien", ("model.aux_loss=0",))


def test_din_beats_base_model_and_nears_the_oracle_position_blind_ci_sized(tmp_path, capsys):
    r = compare(capsys, tmp_path, CI_POSITION_BLIND, common=ONE_PROCESS)
    din, base = r["din"], r["base"]
    assert din["auc"] >= base["auc"] + 0.01, (din, base)
    assert din["gauc"] >= base["gauc"] + 0.01, (din, base)
    assert din["auc"] >= 0.90 * din["oracle_auc"], din


def test_dien_beats_din_and_its_auxiliary_loss_helps_ci_sized(tmp_path, capsys):
    r = compare(capsys, tmp_path, CI_DEFAULT, ("din", "dien", NO_AUX), common=ONE_PROCESS)
    din, dien, no_aux = r["din"], r["dien"], r["dien_no_aux"]
    assert dien["auc"] >= din["auc"] + 0.01, (dien, din)
    assert dien["auc"] >= no_aux["auc"] + 0.005, (dien, no_aux)


@pytest.mark.slow
@pytest.mark.ray
def test_din_beats_base_model_and_nears_the_oracle_position_blind(tmp_path, capsys):
    r = compare(capsys, tmp_path, POSITION_BLIND)
    din, base = r["din"], r["base"]
    assert din["auc"] >= base["auc"] + 0.01, (din, base)
    assert din["auc"] >= 0.97 * din["oracle_auc"], din


@pytest.mark.slow
@pytest.mark.ray
def test_dien_beats_din_beats_base_model_on_default_data(tmp_path, capsys):
    r = compare(capsys, tmp_path, [], ("din", "base", "dien", NO_AUX))
    din, base, dien, no_aux = r["din"], r["base"], r["dien"], r["dien_no_aux"]
    assert din["auc"] >= base["auc"] + 0.01, (din, base)
    assert dien["auc"] >= din["auc"] + 0.01, (dien, din)
    assert dien["auc"] >= no_aux["auc"] + 0.005, (dien, no_aux)

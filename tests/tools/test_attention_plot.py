"""`dinrec eval --attention-plot`: the plotted weights are the model's own weights for the chosen
test row, with the same history under every candidate; the PNG is written."""

import json

import pytest
import torch

from launch.cli import main
from tests.conftest import ROOT


def train_and_plot(data, tmp_path, capsys, *extra: str) -> tuple[list[str], object, dict]:
    """`dinrec train` on the tiny config, then `dinrec eval --attention-plot` of its checkpoint
    for 3 candidates: (the shared arguments, the PNG's path, the eval's JSON line)."""
    args = [
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--no-progress",
        f"data.train={data / 'train'}",
        f"data.test={data / 'test'}",
        f"train.out_dir={tmp_path / 'r'}",
        "train.epochs=1",
        *extra,
    ]
    assert main(["train", *args]) == 0
    capsys.readouterr()
    png = tmp_path / "att.png"
    assert (
        main(["eval", "--checkpoint", str(tmp_path / "r"), "--attention-plot", str(png), "--candidates", "3", *args])
        == 0
    )
    return args, png, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_attention_plot_shows_mians_group_and_global_weights(tiny_zoo_data, tmp_path, capsys):
    from tests.conftest import ZOO_GROUPS, ZOO_TABLES

    _, png, r = train_and_plot(tiny_zoo_data, tmp_path, capsys, ZOO_TABLES, *ZOO_GROUPS, "model.name=mian")
    assert png.stat().st_size > 10_000
    torch.testing.assert_close(torch.tensor(r["weights"]).sum(1), torch.ones(3), atol=1e-3, rtol=0)  # α_t: softmax
    assert r["profile_weights"]["columns"] == ["gender", "age", "occupation"]
    assert r["context_weights"]["columns"] == ["hour", "weekday"]
    assert r["global_weights"]["columns"] == ["e_i", "e_b", "R_ibim", "e_u", "R_iuim", "e_c", "R_icim", "e_o"]
    for key in ("profile_weights", "context_weights", "global_weights"):
        w = torch.tensor(r[key]["weights"])
        assert w.shape == (3, len(r[key]["columns"]))
        torch.testing.assert_close(w.sum(1), torch.ones(3), atol=1e-3, rtol=0)
    # the profile is the user's, the same for every candidate; the weights follow the candidate
    assert not torch.allclose(
        torch.tensor(r["profile_weights"]["weights"])[0], torch.tensor(r["profile_weights"]["weights"])[1]
    )


@pytest.mark.parametrize("model", ["din", "dien"])
def test_attention_plot_weights_are_the_rows_own(tiny_data, tmp_path, capsys, model):
    args, png, r = train_and_plot(tiny_data, tmp_path, capsys, f"model.name={model}", "model.activation=prelu")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    w = torch.tensor(r["weights"])
    assert w.shape == (3, r["behaviours"]) and r["behaviours"] >= 8
    assert len(set(r["candidates"])) == 3
    if model == "dien":  # a_t is a softmax over the history
        torch.testing.assert_close(w.sum(1), torch.ones(3), atol=1e-3, rtol=0)  # weights rounded to 4 digits
    # the first candidate is the row's own: its weights are those the model gives the row in its batch
    from tools.attention_plot import pick
    from trainer import checkpoint
    from trainer.config import load_config
    from trainer.data import stream_from_config
    from trainer.sharding import build_model, process_group

    cfg = load_config(str(ROOT / "configs/tiny.yaml"), args[3:])
    with process_group(cfg) as (_, world):
        m = build_model(cfg, world, torch.device("cpu"))
        checkpoint.load(tmp_path / "r", m)
        m.eval()
        with torch.no_grad():
            for batch in stream_from_config(cfg, "test").epoch(0):
                lengths = batch.sparse["hist_item_id"].lengths()
                rows = torch.nonzero(lengths >= 8).flatten()
                if rows.numel():
                    r0 = int(rows[0])
                    weights, lens = m.module.attention_weights(batch)
                    start = int(lengths[:r0].sum())
                    own = weights[start : start + int(lengths[r0])]
                    break
        picked, _ = pick(cfg, None, 3)
    torch.testing.assert_close(w[0], own.float(), atol=1e-4, rtol=1e-4)
    assert picked.sparse["item_id"].values()[0] == batch.sparse["item_id"].values()[r0]


def test_attention_plot_refuses_base_model(tiny_data, tmp_path, capsys):
    args = [
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--no-progress",
        f"data.train={tiny_data / 'train'}",
        f"data.test={tiny_data / 'test'}",
        f"train.out_dir={tmp_path / 'r'}",
        "model.name=base",
        "train.epochs=1",
    ]
    assert main(["train", *args]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "r"), "--attention-plot", str(tmp_path / "a.png"), *args]) == 2
    assert "has no attention" in capsys.readouterr().err

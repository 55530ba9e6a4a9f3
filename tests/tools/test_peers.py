"""`dinrec bench peers`: DeepCTR-Torch's input matrix built from our batches (checked against a
loop over the KJT's ids, no DeepCTR needed), the refusals, and, where `make peers` has installed
DeepCTR-Torch, a CI-sized run of both sides."""

import json

import numpy as np
import pytest

from launch.cli import main
from tests.conftest import ROOT
from tests.tools.test_bench import BEHAVIOUR_ONLY
from tools import peers


def _argv(tiny_data, *extra):
    return [
        "bench",
        "peers",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        f"data.train={tiny_data / 'train'}",
        f"data.test={tiny_data / 'test'}",
        BEHAVIOUR_ONLY,
        *extra,
    ]


def test_deepctr_inputs_match_the_batch(tiny_cfg):
    from tools.timing import take

    cfg = tiny_cfg(BEHAVIOUR_ONLY)
    (batch,) = take(cfg, 1)
    L = cfg.data.max_hist_len
    index = {
        "item_id": (0, 1),
        "cate_id": (1, 2),
        "hist_item_id": (2, 2 + L),
        "hist_cate_id": (2 + L, 2 + 2 * L),
        "seq_length": (2 + 2 * L, 3 + 2 * L),
    }
    x = peers.deepctr_inputs(batch, index, L).numpy()
    want = np.zeros_like(x)
    for name, (start, _) in index.items():
        if name == "seq_length":
            continue
        jt = batch.feature(name)
        vals, lens = jt.values().tolist(), jt.lengths().tolist()
        pos = 0
        for row, n in enumerate(lens):
            for j in range(n):
                want[row, start + j] = vals[pos + j] + 1  # DeepCTR's 0 is padding
            pos += n
    want[:, 2 + 2 * L] = batch.sparse["hist_item_id"].lengths().numpy()
    assert want[:, 2 + 2 * L].min() >= 1 and (want[:, 2 : 2 + L] == 0).any()  # real lengths, some padding
    np.testing.assert_array_equal(x, want)


def test_bench_peers_refusals(tiny_data, tmp_path, capsys):
    assert main(_argv(tiny_data, "--peers-dir", str(tmp_path))) != 0
    assert "run `make peers` first" in capsys.readouterr().err
    assert main(_argv(tiny_data, "--models", "din,xdeepfm")) != 0
    assert "--models 'din,xdeepfm'" in capsys.readouterr().err


@pytest.mark.skipif(not (peers.PEERS_DIR / "deepctr_torch").is_dir(), reason="DeepCTR-Torch not installed")
def test_bench_peers_runs_both_sides(tiny_data, capsys):
    argv = _argv(tiny_data, "--models", "base,din_dice,dien", "--steps", "2", "--warmup", "1", "--rounds", "1")
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for m in ("base", "din_dice", "dien"):
        got = r["models"][m]
        assert got["dinrec_samples_per_s"] > 0 and got["deepctr_samples_per_s"] > 0
        ratio = got["dinrec_samples_per_s"] / got["deepctr_samples_per_s"]
        assert abs(got["ratio_dinrec_over_deepctr"] - ratio) < 0.01 and len(got["ratio_per_round"]) == 1

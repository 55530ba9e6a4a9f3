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


def test_gemm_shapes_and_account_against_a_linear_layer():
    """tools.timing.gemm_shapes records a Linear's forward product and both backward ones (input
    and weight gradients), under bf16 autocast in bf16; gemm_account's GFLOP is 2·m·k·n summed."""
    import torch

    from tools.timing import gemm_account, gemm_shapes

    lin = torch.nn.Linear(256, 128)
    x = torch.randn(512, 256, requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(x)
        y.float().sum().backward()

    shapes = gemm_shapes(step)
    got = sorted((b, m, k, n) for b, m, k, n, _ in shapes)
    # forward [512 x 256] x [256 x 128]; input gradient [512 x 128] x [128 x 256]; weight gradient
    # [128 x 512] x [512 x 256] (or its transpose, as autograd orders it)
    assert got in (
        sorted([(1, 512, 256, 128), (1, 512, 128, 256), (1, 128, 512, 256)]),
        sorted([(1, 512, 256, 128), (1, 512, 128, 256), (1, 256, 512, 128)]),
    ), got
    assert {d for *_, d in shapes} == {torch.bfloat16}
    acc = gemm_account(shapes, 0.001)
    assert acc["gemm_gflop_per_step"] == round(3 * 2 * 512 * 256 * 128 / 1e9, 4) == 0.1007
    assert acc["step_gflops"] == round(acc["gemm_gflop_per_step"] / 0.001, 1)
    assert acc["gemms_per_step"] == 3 and acc["gemm_dtypes"] == ["bfloat16"]
    assert acc["gemms_alone_ms"]["fp32"] > 0 and acc["gemms_alone_ms"]["bf16"] > 0


def test_gemm_shapes_count_the_fused_attention_units_products():
    """The fused attention op runs its products by block on BLAS, out of the dispatcher's sight:
    gemm_shapes counts them as the whole products. They are the layer-by-layer unit's
    per-behaviour products (whose [N, ·] matmuls the dispatcher sees), except that layer 1 takes
    the candidate into its weights and multiplies D columns instead of [h, h ⊙ c]'s 2D."""
    import torch

    from tools.timing import gemm_shapes
    from trainer.models.layers import LocalActivationUnit

    lengths = torch.tensor([5, 0, 7, 3])
    hist = torch.randn(int(lengths.sum()), 4, requires_grad=True)
    cand = torch.randn(4, 4, requires_grad=True)

    def flop(kernel: str) -> int:
        torch.manual_seed(0)
        lau = LocalActivationUnit(4, [6, 5], "prelu", kernel)
        shapes = gemm_shapes(lambda: lau(hist, cand, lengths).sum().backward())
        per_behaviour = [(b, m, k, n) for b, m, k, n, _ in shapes if 15 in (m, k)]  # N = 15 behaviours
        return sum(2 * b * m * k * n for b, m, k, n in per_behaviour)

    # forward 15·8·6 + 15·6·5 + 15·5·1, backward twice that (the first layer's input gradient included)
    assert flop("layers") == 3 * 2 * (15 * 8 * 6 + 15 * 6 * 5 + 15 * 5 * 1)
    assert flop("fused") == 3 * 2 * (15 * 4 * 6 + 15 * 6 * 5 + 15 * 5 * 1)  # layer 1 over h's 4 columns

"""DIEN: the C++ sequence kernel against the Python step loop (itself tested against torch.nn.GRU
in test_gru.py), the padding helper against numpy, the model's independence from batch mates and
padding, the reader's negatives, and DIEN training on 1 and 2 ranks."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embedding.layout import FeatureLayout
from trainer.config import ConfigError
from trainer.data import DataError, sample_negatives, stream_from_config
from trainer.models.dien import DIEN, padded
from trainer.models.gru import AttentionGRUCell, run_sequence, sequence


@pytest.mark.parametrize("rows", [6, 150], ids=["6rows", "150rows"])  # 150: several parallel chunks of rows
@pytest.mark.parametrize("fused", [True, False], ids=["cpu_fused", "aten"])
@pytest.mark.parametrize("kind", ["gru", "aigru", "agru", "augru"])
def test_sequence_kernel_equals_step_loop_values_and_gradients(kind, fused, rows):
    torch.manual_seed(0)
    cell = AttentionGRUCell(3, 4).double()
    x = torch.randn(rows, 7, 3, dtype=torch.float64, requires_grad=True)
    att = torch.rand(rows, 7, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 4, 0, 1, 3, 7])
    lengths = torch.cat([lengths, torch.randint(0, 8, (rows - 6,))])
    want_s, want_h = run_sequence(cell, x, lengths, att, kind)
    got_s, got_h = sequence(cell, x, lengths, att, kind, fused)
    torch.testing.assert_close(got_s, want_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_h, want_h, rtol=1e-12, atol=1e-12)
    ws, wh = torch.randn_like(want_s), torch.randn_like(want_h)
    params = [x, att, *cell.parameters()]
    want = torch.autograd.grad((want_s * ws).sum() + (want_h * wh).sum(), params, allow_unused=True)
    got = torch.autograd.grad((got_s * ws).sum() + (got_h * wh).sum(), params, allow_unused=True)
    for w, g in zip(want, got, strict=True):
        if w is None:
            assert g is None or not g.abs().any()  # attention does not enter a plain GRU
        else:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # the last state alone (DIEN's evolution layer): no gradient comes through the states
    want = torch.autograd.grad((run_sequence(cell, x, lengths, att, kind)[1] * wh).sum(), params, allow_unused=True)
    got = torch.autograd.grad((sequence(cell, x, lengths, att, kind, fused)[1] * wh).sum(), params, allow_unused=True)
    for w, g in zip(want, got, strict=True):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def _triton_case(kind: str, device: str, b: int = 20, t: int = 7, h: int = 12, seed: int = 0):
    """A float32 case for the Triton kernel (two programs of 16 rows, the last part full; H
    padded to 16) and its float64 step-loop reference with the same weights."""
    torch.manual_seed(seed)
    cell = AttentionGRUCell(5, h).to(device)
    x = torch.randn(b, t, 5, device=device, requires_grad=True)
    att = torch.rand(b, t, device=device, requires_grad=True)
    lengths = torch.randint(0, t + 1, (b,), device=device)
    lengths[:2] = torch.tensor([t, 0])
    ref = AttentionGRUCell(5, h).double().to(device)
    ref.load_state_dict({k: v.double() for k, v in cell.state_dict().items()})
    return cell, x, att, lengths, ref


@pytest.mark.parametrize("kind", ["gru", "aigru", "agru", "augru"])
def test_triton_sequence_kernel_equals_step_loop(kind):
    """The Triton kernel (here in Triton's interpreter) against the float64 step loop: states,
    last state and every gradient, to float32 rounding."""
    cell, x, att, lengths, ref = _triton_case(kind, "cpu")
    got_s, got_h = sequence(cell, x, lengths, att, kind, kernel="triton")
    x64, att64 = x.detach().double().requires_grad_(), att.detach().double().requires_grad_()
    want_s, want_h = run_sequence(ref, x64, lengths, att64, kind)
    torch.testing.assert_close(got_s, want_s.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h, want_h.float(), rtol=1e-5, atol=1e-6)
    assert not got_s[1].any()  # a row without behaviours: zero states
    ws, wh = torch.randn_like(got_s), torch.randn_like(got_h)
    got = torch.autograd.grad((got_s * ws).sum() + (got_h * wh).sum(), [x, att, *cell.parameters()], allow_unused=True)
    want = torch.autograd.grad(
        (want_s * ws.double()).sum() + (want_h * wh.double()).sum(), [x64, att64, *ref.parameters()], allow_unused=True
    )
    for w, g in zip(want, got, strict=True):
        if w is None:
            assert g is None or not g.abs().any()
        else:
            torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5)


def test_triton_sequence_kernel_refuses_what_it_cannot_run():
    cell = AttentionGRUCell(3, 4).double()
    with pytest.raises(ValueError, match="float32 inputs only"):
        sequence(cell, torch.randn(2, 3, 3, dtype=torch.float64), torch.tensor([3, 1]), kernel="triton")
    big = AttentionGRUCell(3, 129)
    with pytest.raises(ValueError, match="hidden size 129 above 128"):
        sequence(big, torch.randn(2, 3, 3), torch.tensor([3, 1]), kernel="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gru", "agru", "augru"])
def test_triton_sequence_kernel_on_cuda_equals_step_loop(kind):
    """What the GPU runs by default (kernel auto, float32): the Triton kernel compiled."""
    cell, x, att, lengths, ref = _triton_case(kind, "cuda", b=300, t=50, h=32)
    got = sequence(cell, x, lengths, att, kind)
    x64, att64 = x.detach().double().requires_grad_(), att.detach().double().requires_grad_()
    want = run_sequence(ref, x64, lengths, att64, kind)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5)
    gg = torch.autograd.grad(sum(t.sum() for t in got), [x, att, *cell.parameters()], allow_unused=True)
    gw = torch.autograd.grad(sum(t.sum() for t in want), [x64, att64, *ref.parameters()], allow_unused=True)
    for w, g in zip(gw, gg, strict=True):
        if w is not None:
            torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gru", "agru", "augru"])
def test_sequence_kernel_on_cuda_equals_step_loop(kind):
    torch.manual_seed(0)
    cell = AttentionGRUCell(16, 16).double().cuda()
    x = torch.randn(64, 20, 16, dtype=torch.float64, device="cuda", requires_grad=True)
    att = torch.rand(64, 20, dtype=torch.float64, device="cuda", requires_grad=True)
    lengths = torch.randint(0, 21, (64,), device="cuda")
    want = run_sequence(cell, x, lengths, att, kind)
    got = sequence(cell, x, lengths, att, kind)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    gw = torch.autograd.grad(sum(t.sum() for t in want), [x, *cell.parameters()])
    gg = torch.autograd.grad(sum(t.sum() for t in got), [x, *cell.parameters()])
    for w, g in zip(gw, gg, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_sequence_kernel_gradcheck_augru():
    torch.manual_seed(1)
    cell = AttentionGRUCell(2, 3).double()
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    att = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])
    assert torch.autograd.gradcheck(lambda x, a: sequence(cell, x, lengths, a, "augru"), (x, att))


def test_sequence_kernel_matches_torch_gru_in_float32():
    torch.manual_seed(2)
    ref = torch.nn.GRU(8, 8, batch_first=True)
    cell = AttentionGRUCell(8, 8)
    cell.load_torch_gru(ref)
    x = torch.randn(16, 12, 8)
    want_all, want_last = ref(x)
    states, last = sequence(cell, x, torch.full((16,), 12))
    torch.testing.assert_close(states, want_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, want_last[0], rtol=1e-5, atol=1e-5)


def test_padded_matches_numpy():
    lengths = np.array([2, 0, 3, 1])
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    want = np.zeros((4, 5, 2), np.float32)
    k = 0
    for row, n in enumerate(lengths):
        want[row, :n] = values[k : k + n]
        k += n
    got = padded(torch.from_numpy(values), torch.from_numpy(lengths), 5)
    np.testing.assert_array_equal(got.numpy(), want)


def _dien(tiny_cfg, *overrides):
    cfg = tiny_cfg("model.name=dien", "model.activation=prelu", *overrides)
    layout = FeatureLayout.from_config(cfg)
    torch.manual_seed(1)
    model = DIEN(layout, cfg.model, 0)
    for t in model.sparse.ec.embeddings.values():
        torch.nn.init.normal_(t.weight, std=0.5)
    return cfg, layout, model


@pytest.mark.parametrize("evolution", ["augru", "agru", "aigru"])
def test_dien_output_per_row_does_not_depend_on_batch_mates(tiny_cfg, evolution):
    cfg, _, dien = _dien(tiny_cfg, f"model.evolution={evolution}")
    dien.eval()
    batch = next(iter(stream_from_config(cfg, "test").epoch(0)))
    lengths = batch.sparse["hist_item_id"].lengths()
    assert lengths.min() < lengths.max()  # rows are padded to the longest history of the batch
    cfg1 = tiny_cfg("model.name=dien", "data.batch_size=1")
    with torch.no_grad():
        whole = dien(batch)
        singles = [dien(b) for _, b in zip(range(6), stream_from_config(cfg1, "test").epoch(0), strict=False)]
    np.testing.assert_allclose(torch.cat(singles).numpy(), whole[:6].numpy(), rtol=1e-5, atol=1e-6)


def test_dien_depends_on_behaviour_order(tiny_cfg):
    """Unlike DIN's attention, the GRUs see the order of the behaviours."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    cfg, _, dien = _dien(tiny_cfg)
    dien.eval()
    batch = next(iter(stream_from_config(cfg, "test").epoch(0)))
    jts = batch.sparse.to_dict()
    lengths = jts["hist_item_id"].lengths()
    off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    rev = torch.cat([torch.arange(int(off[i + 1]) - 1, int(off[i]) - 1, -1) for i in range(len(lengths))])
    values = [
        jts[k].values()[rev] if k.startswith(("hist_", "neg_hist_")) else jts[k].values() for k in batch.sparse.keys()
    ]
    batch_rev = type(batch)(
        **{
            **batch.__dict__,
            "sparse": KeyedJaggedTensor(
                keys=batch.sparse.keys(), values=torch.cat(values), lengths=batch.sparse.lengths()
            ),
        }
    )
    with torch.no_grad():
        a, b = dien(batch), dien(batch_rev)
    multi = lengths > 1
    assert (a[multi] - b[multi]).abs().min() > 0
    torch.testing.assert_close(a[~multi], b[~multi])


def test_dien_training_loss_adds_alpha_times_auxiliary_loss(tiny_cfg):
    from trainer.step import training_loss

    cfg, _, dien = _dien(tiny_cfg, "model.aux_loss=0.3")
    batch = next(iter(stream_from_config(cfg, "train").epoch(0)))
    dien.train()
    torch.manual_seed(5)
    logits, aux = dien(batch)
    dien.tower.alpha = 0.6  # the term scales with α
    torch.manual_seed(5)
    _, aux2 = dien(batch)
    torch.testing.assert_close(aux2, 2 * aux)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
    torch.manual_seed(5)
    torch.testing.assert_close(training_loss(dien, batch), bce + aux2)
    dien.eval()
    assert isinstance(dien(batch), torch.Tensor)  # evaluation: logits only


def test_layout_adds_negatives_only_for_dien_with_aux_loss(tiny_cfg):
    def neg_keys(*o):
        return [k for k in FeatureLayout.from_config(tiny_cfg(*o)).keys if k.startswith("neg_")]

    assert neg_keys("model.name=dien") == ["neg_hist_item_id", "neg_hist_cate_id"]
    assert neg_keys("model.name=dien", "model.aux_loss=0") == []
    assert neg_keys("model.name=din") == []
    with pytest.raises(ConfigError, match="aux_loss: must be >= 0"):
        tiny_cfg("model.name=dien", "model.aux_loss=-1")
    with pytest.raises(ConfigError, match="neg_hist_item_id"):
        tiny_cfg("tables=[{name: item, num_rows: 500, dim: 8, features: [item_id, hist_item_id, neg_hist_item_id]}]")


# ---- negatives


def _behaviours(rng, rows=400, items=60, max_len=12):
    lengths = rng.integers(0, max_len, rows)
    off = np.concatenate([[0], np.cumsum(lengths)])
    item = rng.zipf(1.5, off[-1]) % items
    cate = item // 10
    return {"hist_item_id": (off, item), "hist_cate_id": (off, cate)}


@pytest.mark.parametrize("how", ["frequency", "uniform"])
def test_sampled_negatives_are_other_real_behaviours(how):
    rng = np.random.default_rng(0)
    lists = _behaviours(rng)
    neg = sample_negatives(
        lists,
        [("hist_item_id", "neg_hist_item_id"), ("hist_cate_id", "neg_hist_cate_id")],
        how,
        np.random.default_rng(1),
    )
    off, item = lists["hist_item_id"]
    n_off, n_item = neg["neg_hist_item_id"]
    np.testing.assert_array_equal(n_off, off)  # aligned with the history
    assert (n_item != item).all()  # never the behaviour's own item
    np.testing.assert_array_equal(neg["neg_hist_cate_id"][1], n_item // 10)  # real (item, category) pairs
    assert set(n_item) <= set(item)


def test_negative_samplers_follow_their_distributions():
    rng = np.random.default_rng(0)
    off = np.array([0, 200_000])
    item = np.minimum(rng.zipf(1.3, 200_000), 50) - 1  # a long-tailed behaviour distribution
    lists = {"hist_item_id": (off, item)}
    pairs = [("hist_item_id", "neg_hist_item_id")]
    freq = np.bincount(item, minlength=50) / item.size
    for how, want in (("frequency", None), ("uniform", np.full(50, 1 / 50))):
        drawn = sample_negatives(lists, pairs, how, np.random.default_rng(2))["neg_hist_item_id"][1]
        got = np.bincount(drawn, minlength=50) / item.size
        if want is None:  # frequency: the behaviour distribution without the item itself, renormalised
            want = freq * (1 - freq)
            want /= want.sum()
        assert np.abs(got - want).max() < 0.01, how


def test_negatives_are_deterministic_and_independent_of_world_size(tiny_cfg):
    cfg = tiny_cfg("model.name=dien", "data.batch_size=50")

    def by_sample(streams):
        out = {}
        for s in streams:
            rows = s.rows_for(0)  # a rank's own rows come first, then padding repeats
            for b in s.epoch(0):
                jts = b.sparse.to_dict()
                neg = jts["neg_hist_item_id"]
                for u, t, n in zip(
                    b.users.tolist(),
                    jts["item_id"].values().tolist(),
                    torch.split(neg.values(), neg.lengths().tolist()),
                    strict=True,
                ):
                    if rows > 0:
                        out.setdefault((u, t), []).append(tuple(n.tolist()))
                    rows -= 1
        return {k: sorted(v) for k, v in out.items()}

    one = by_sample([stream_from_config(cfg, "train")])
    two = by_sample([stream_from_config(cfg, "train", rank=r, world_size=2) for r in range(2)])
    assert one == two and one == by_sample([stream_from_config(cfg, "train")])


def test_negatives_from_the_file_are_used_as_given(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model.name=dien")
    table = pq.read_table(sorted(Path(cfg.data.test).glob("*.parquet"))[0])
    flat = table["hist_item_id"].combine_chunks()  # negatives: the next item id, category 3
    new_values = pa.array((flat.values.to_numpy() + 1) % 500)
    neg = pa.ListArray.from_arrays(flat.offsets, new_values)
    neg_c = pa.ListArray.from_arrays(flat.offsets, pa.array(np.full(len(new_values), 3, np.int64)))
    (tmp_path / "d").mkdir()
    pq.write_table(
        table.append_column("neg_hist_item_id", neg).append_column("neg_hist_cate_id", neg_c),
        tmp_path / "d" / "x.parquet",
    )
    s = stream_from_config(tiny_cfg("model.name=dien", f"data.test={tmp_path / 'd'}"), "test")
    b = next(iter(s.epoch(0)))
    jts = b.sparse.to_dict()
    torch.testing.assert_close(jts["neg_hist_item_id"].values(), (jts["hist_item_id"].values() + 1) % 500)
    assert (jts["neg_hist_cate_id"].values() == 3).all()
    pq.write_table(table.append_column("neg_hist_item_id", neg), tmp_path / "d" / "x.parquet")
    with pytest.raises(DataError, match="column 'neg_hist_cate_id': missing"):
        stream_from_config(tiny_cfg("model.name=dien", f"data.test={tmp_path / 'd'}"), "test")


def test_dien_trains_in_one_process(tiny_cfg):
    import json

    from trainer.loop import train

    cfg = tiny_cfg("model.name=dien", "train.epochs=3", "model.aux_loss=0.05")
    r = train(cfg, progress=False)
    assert r["model"] == "dien" and 0 < r["auc"] < 1 and np.isfinite(r["logloss"])
    log = [json.loads(x) for x in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in log if "loss" in x]
    assert len(losses) > 10 and np.mean(losses[-3:]) < np.mean(losses[:3])  # training lowers L = L_target + α·L_aux


def test_triton_sequence_kernels_compile_for_the_gpu():
    """Both GRU kernels, every mode and width the wrapper launches, compile for an H100/H200
    (sm_90) with Triton's compiler and ptxas, here without a GPU."""
    from tests.conftest import compiled_for_the_gpu

    p = compiled_for_the_gpu("-m", "trainer.models.gru_triton", "90")
    lines = [x for x in p.stdout.splitlines() if "registers" in x]
    assert len(lines) == 2 * 3 * 3  # forward and backward; GRU, AGRU, AUGRU; BLOCK_H 32, 64, 128


def test_dien_with_the_triton_kernel_equals_the_cpp_kernel(tiny_cfg):
    """The whole model, loss and gradients, with model.gru_kernel=triton (as on a GPU; here in
    Triton's interpreter) against the C++ kernel, same weights and batch."""
    from trainer.step import training_loss

    cfg, _, cpp = _dien(tiny_cfg, "model.aux_loss=0.5", "model.gru_kernel=cpp")
    _, _, tri = _dien(tiny_cfg, "model.aux_loss=0.5", "model.gru_kernel=triton")
    tri.load_state_dict(cpp.state_dict())
    batch = next(iter(stream_from_config(cfg, "train").epoch(0)))
    cpp.train(), tri.train()
    want, got = training_loss(cpp, batch), training_loss(tri, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    gw = torch.autograd.grad(want, list(cpp.tower.parameters()))
    gg = torch.autograd.grad(got, list(tri.tower.parameters()))
    for w, g in zip(gw, gg, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("evolution", ["augru", "aigru"])
def test_dien_padded_to_the_configured_longest_history_is_the_same(tiny_cfg, evolution):
    """On a GPU DIEN pads every batch to data.max_hist_len (no read of the device for the batch's
    longest): the loss and its gradients are those of padding to the batch's longest."""
    from trainer.step import training_loss

    cfg, _, dien = _dien(tiny_cfg, f"model.evolution={evolution}", "model.aux_loss=0.5", "data.max_hist_len=40")
    batch = next(iter(stream_from_config(cfg, "train").epoch(0)))
    assert int(batch.sparse["hist_item_id"].lengths().max()) <= 30  # so 10+ steps of padding more
    dien.train()
    out = {}
    for static in (False, True):
        dien.tower.static_steps = static
        torch.manual_seed(3)
        loss = training_loss(dien, batch)
        out[static] = (loss, torch.autograd.grad(loss, list(dien.tower.parameters())))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(out[True][1], out[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

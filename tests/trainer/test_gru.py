"""DIEN's GRU cells against torch.nn.GRU, padding, AUGRU with attention 1, and gradcheck."""

import pytest
import torch

from trainer.models.gru import AttentionGRUCell, run_sequence


def test_gru_matches_torch_gru_on_unpadded_sequences():
    torch.manual_seed(0)
    ref = torch.nn.GRU(5, 7, batch_first=True)
    cell = AttentionGRUCell(5, 7)
    cell.load_torch_gru(ref)
    x = torch.randn(4, 6, 5)
    want_all, want_last = ref(x)
    states, last = run_sequence(cell, x, torch.full((4,), 6))
    torch.testing.assert_close(states, want_all)
    torch.testing.assert_close(last, want_last[0])


@pytest.mark.parametrize("kind", ["gru", "aigru", "agru", "augru"])
def test_padding_changes_nothing(kind):
    torch.manual_seed(1)
    cell = AttentionGRUCell(3, 4)
    lengths = torch.tensor([2, 5, 0, 3])
    x = torch.randn(4, 5, 3)
    att = torch.rand(4, 5)
    junk_x, junk_att = x.clone(), att.clone()
    pad = torch.arange(5).unsqueeze(0) >= lengths.unsqueeze(1)
    junk_x[pad] = 100.0
    junk_att[pad] = 0.7
    s1, h1 = run_sequence(cell, x, lengths, att, kind)
    s2, h2 = run_sequence(cell, junk_x, lengths, junk_att, kind)
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(s1, s2)
    for r, n in enumerate(lengths.tolist()):  # each row alone, unpadded
        _, alone = run_sequence(cell, x[r : r + 1, :n], torch.tensor([n]), att[r : r + 1, :n], kind)
        torch.testing.assert_close(h1[r : r + 1], alone)
    assert torch.equal(h1[2], torch.zeros(4))  # empty history: the initial state


def test_augru_and_aigru_with_attention_one_equal_gru_and_agru_zero_keeps_state():
    torch.manual_seed(2)
    cell = AttentionGRUCell(3, 4)
    x, lengths = torch.randn(5, 6, 3), torch.tensor([6, 4, 1, 6, 3])
    ones = torch.ones(5, 6)
    _, gru = run_sequence(cell, x, lengths)
    for kind in ("augru", "aigru"):
        torch.testing.assert_close(run_sequence(cell, x, lengths, ones, kind)[1], gru)
    h = torch.randn(5, 4)
    torch.testing.assert_close(cell(x[:, 0], h, torch.zeros(5), "agru"), h)
    torch.testing.assert_close(cell(x[:, 0], h, torch.zeros(5), "augru"), h)


def test_augru_cell_gradcheck_float64():
    torch.manual_seed(3)
    cell = AttentionGRUCell(3, 4).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h, a: cell(x, h, a, "augru"), (x, h, a))
    params = tuple(cell.parameters())
    assert torch.autograd.gradcheck(
        lambda *p: torch.func.functional_call(
            cell, dict(zip([n for n, _ in cell.named_parameters()], p, strict=True)), (x, h, a, "augru")
        ),
        params,
    )


def test_auxiliary_loss_equals_numpy_eq6():
    import numpy as np

    from trainer.models.dien import auxiliary_loss

    rng = np.random.default_rng(0)
    B, T, H = 3, 5, 4
    h, e, e_neg = (rng.standard_normal((B, T, H)) for _ in range(3))
    lengths = np.array([5, 2, 0])
    total = 0.0
    for i in range(B):
        for t in range(lengths[i] - 1):  # h_t is supervised by behaviour t + 1
            sig = lambda a, b: 1 / (1 + np.exp(-(a @ b)))  # noqa: E731
            total += np.log(sig(h[i, t], e[i, t + 1])) + np.log(1 - sig(h[i, t], e_neg[i, t + 1]))
    want = -total / B
    got = auxiliary_loss(*(torch.tensor(a) for a in (h, e, e_neg)), torch.tensor(lengths))
    assert abs(float(got) - want) < 1e-10


def test_auxiliary_network_loss_equals_numpy_mlp():
    """The released code's σ(h_t, e): BatchNorm over the supervised steps' [h_t, e] rows (positives
    and negatives together), 100 → sigmoid → 50 → sigmoid → logit, written out in numpy."""
    import numpy as np

    from trainer.models.dien import AuxiliaryNet, auxiliary_loss

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    B, T, H = 3, 5, 4
    h, e, e_neg = (rng.standard_normal((B, T, H)) for _ in range(3))
    lengths = np.array([5, 3, 1])
    net = AuxiliaryNet(H).double().train()
    bn = net.net[0]
    with torch.no_grad():  # a BatchNorm that is not the identity
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    w = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    steps = [(i, t) for i in range(B) for t in range(lengths[i] - 1)]
    rows = np.array(
        [np.concatenate([h[i, t], e[i, t + 1]]) for i, t in steps]
        + [np.concatenate([h[i, t], e_neg[i, t + 1]]) for i, t in steps]
    )
    z = (rows - rows.mean(0)) / np.sqrt(rows.var(0) + bn.eps) * w["net.0.weight"] + w["net.0.bias"]
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    for k in (1, 3):
        z = sig(z @ w[f"net.{k}.weight"].T + w[f"net.{k}.bias"])
    logit = (z @ w["net.5.weight"].T + w["net.5.bias"])[:, 0]
    n = len(steps)
    want = -(np.log(sig(logit[:n])).sum() + np.log(1 - sig(logit[n:])).sum()) / B
    got = auxiliary_loss(*(torch.tensor(a) for a in (h, e, e_neg)), torch.tensor(lengths), net)
    assert abs(float(got) - want) < 1e-10

"""The fused local activation unit (trainer.models.attention, C++) against the paper's unit written
out in plain PyTorch on the concatenated input [e, v, e − v, e ⊙ v]: values and every gradient,
in float64 (exact to rounding), float32, and bfloat16 products; histories longer than a block,
empty ones, several blocks on several threads, more blocks than the backward's parts (runs of
blocks whose weight gradients are summed in place)."""

from __future__ import annotations

import pytest
import torch

from trainer.models.attention import bf16_pairs
from trainer.models.layers import LocalActivationUnit


def _unit(dim: int, hidden: list[int], dtype, kernel: str = "auto", seed: int = 0) -> LocalActivationUnit:
    torch.manual_seed(seed)
    lau = LocalActivationUnit(dim, hidden, "prelu", kernel).to(dtype)
    with torch.no_grad():  # PReLU's α on both sides of zero, so both branches are exercised
        for m in list(lau.mlp)[1:-1:2]:
            m.weight.uniform_(-0.5, 0.5)
    return lau


def _inputs(lengths: list[int], dim: int, dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    hist = torch.randn(n, dim, dtype=dtype, generator=g).requires_grad_()
    cand = torch.randn(len(lengths), dim, dtype=dtype, generator=g).requires_grad_()
    return hist, cand, torch.tensor(lengths)


def naive(lau: LocalActivationUnit, hist, cand, lengths):
    """Eq. 3 as the paper writes it: the MLP on [e, v, e − v, e ⊙ v], weights times e, summed per row."""
    c = cand.repeat_interleave(lengths, 0)
    w = lau.mlp(torch.cat([hist, c, hist - c, hist * c], 1))
    rows = torch.arange(len(lengths)).repeat_interleave(lengths)
    return torch.zeros_like(cand).index_add(0, rows, w * hist)


def _value_and_grads(lau, f, hist, cand):
    out = f()
    weights = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
    return out.detach(), *torch.autograd.grad((out * weights).sum(), [hist, cand, *lau.parameters()])


# lengths: several blocks of about 256 behaviours, empty histories, one longer than a block
LENGTHS = [3, 0, 50, 1, 0, 300, 2, *([47] * 20), 0]
MANY = LENGTHS * 8  # about 40 blocks: more than the backward's 32 parts, so a part sums several


@pytest.mark.parametrize("hidden", [[5], [6, 4], [7, 5, 3]])
def test_fused_unit_equals_the_paper_unit_in_float64(hidden):
    lau = _unit(4, hidden, torch.float64)
    hist, cand, lengths = _inputs(MANY, 4, torch.float64)
    assert lau._fused(hist)
    got = _value_and_grads(lau, lambda: lau(hist, cand, lengths), hist, cand)
    want = _value_and_grads(lau, lambda: naive(lau, hist, cand, lengths), hist, cand)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)


def test_fused_unit_passes_gradcheck():
    """Finite differences against the op's backward, for the inputs and every parameter."""
    lau = _unit(3, [4, 3], torch.float64)
    hist, cand, lengths = _inputs([2, 0, 5, 1], 3, torch.float64)
    names = [n for n, _ in lau.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in lau.parameters()]

    def f(h, c, *p):
        return torch.func.functional_call(lau, dict(zip(names, p, strict=True)), (h, c, lengths))

    assert lau._fused(hist)
    assert torch.autograd.gradcheck(f, (hist, cand, *params))


def test_fused_unit_float32_matches_the_layers_and_does_not_depend_on_threads():
    fused, layers = _unit(16, [80, 40], torch.float32), _unit(16, [80, 40], torch.float32, kernel="layers")
    hist, cand, lengths = _inputs(MANY, 16, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _value_and_grads(fused, lambda: fused(hist, cand, lengths), hist, cand)
        torch.set_num_threads(2)
        two = _value_and_grads(fused, lambda: fused(hist, cand, lengths), hist, cand)
    finally:
        torch.set_num_threads(threads)
    want = _value_and_grads(layers, lambda: layers(hist, cand, lengths), hist, cand)
    for a, b, w in zip(one, two, want, strict=True):
        assert torch.equal(a, b)  # parts' sums added in part order on any number of threads
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("dim", "hidden"), [(16, [80, 40]), (3, [5, 3]), (7, [9])])
def test_fused_unit_in_bfloat16_is_within_its_rounding_of_float64(dim, hidden):
    """Under bf16 autocast the products run in bfloat16 (z_k stored rounded); on a CPU with
    AVX512-BF16 as pair products (odd widths: a last pair of one value). bfloat16's 8 bits move
    the gradients far from float64 in either path (up to about 20 % of a tensor's largest entry
    for ∂hist layer by layer here): the fused unit's error, output and every gradient, is at most
    1.5 times the layer-by-layer unit's under the same autocast (plus 0.5 % of the largest
    entry), and the output within 1 %."""
    lau = _unit(dim, hidden, torch.float32, kernel="fused")
    ref = _unit(dim, hidden, torch.float64)
    ref.load_state_dict({k: v.double() for k, v in lau.state_dict().items()})
    layers = _unit(dim, hidden, torch.float32, kernel="layers")
    layers.load_state_dict(lau.state_dict())
    hist, cand, lengths = _inputs(LENGTHS, dim, torch.float32)
    h64, c64 = hist.detach().double().requires_grad_(), cand.detach().double().requires_grad_()
    want = _value_and_grads(ref, lambda: naive(ref, h64, c64, lengths), h64, c64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _value_and_grads(lau, lambda: lau(hist, cand, lengths), hist, cand)
        unfused = _value_and_grads(layers, lambda: layers(hist, cand, lengths), hist, cand)
    for g, u, w in zip(got, unfused, want, strict=True):
        scale = w.abs().max().item()
        err, err_layers = (g.double() - w).abs().max().item(), (u.double() - w).abs().max().item()
        assert err <= 1.5 * err_layers + 0.005 * scale, (err, err_layers, scale)
    assert (got[0].double() - want[0]).abs().max() <= 0.01 * want[0].abs().max()


def test_fused_unit_without_grad_gives_the_same_output():
    lau = _unit(8, [10, 6], torch.float32)
    hist, cand, lengths = _inputs(LENGTHS, 8, torch.float32)
    with torch.no_grad():
        once = lau(hist, cand, lengths)
    assert torch.equal(once, lau(hist, cand, lengths).detach())


def test_which_units_are_fused():
    hist = torch.zeros(3, 4)
    assert _unit(4, [5], torch.float32)._fused(hist)
    assert not _unit(4, [5], torch.float32, kernel="layers")._fused(hist)
    assert not LocalActivationUnit(4, [5], "dice")._fused(hist)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # auto: fused where bf16 products run as AVX512-BF16 pairs, else layer by layer
        assert _unit(4, [5], torch.float32)._fused(hist) == bf16_pairs()
        assert _unit(4, [5], torch.float32, kernel="fused")._fused(hist)
    with pytest.raises(ValueError, match="runs on the CPU"):
        _unit(4, [5], torch.float32, kernel="fused")._fused(torch.zeros(3, 4, device="meta"))
    with pytest.raises(ValueError, match="takes PReLU"):
        LocalActivationUnit(4, [5], "dice", "fused")
    with pytest.raises(ValueError, match="attention kernel"):
        LocalActivationUnit(4, [5], "prelu", "fast")

"""trainer.models.jagged: the row gather and segment sum against numpy loops, their backward by
finite differences (gradcheck, float64), and the same values and gradients through torch.compile."""

import numpy as np
import pytest
import torch

from trainer.models.jagged import gather_rows, segment_sum


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 0, 1, 4, 2])
    rows = torch.repeat_interleave(torch.arange(5), lengths)
    values = torch.randn(int(lengths.sum()), 3, generator=g, dtype=torch.float64)
    table = torch.randn(5, 3, generator=g, dtype=torch.float64)
    return rows, values, table


def test_values_against_numpy_loops():
    rows, values, table = _case()
    want_sum = np.zeros((5, 3))
    for v, r in zip(values.numpy(), rows.numpy(), strict=True):
        want_sum[r] += v
    np.testing.assert_allclose(segment_sum(values, rows, 5).numpy(), want_sum, rtol=1e-12)
    assert not segment_sum(values, rows, 5)[1].any()  # a row without values sums to zero
    want_gather = np.stack([table.numpy()[r] for r in rows.numpy()])
    np.testing.assert_array_equal(gather_rows(table, rows).numpy(), want_gather)


def test_backward_by_finite_differences():
    rows, values, table = _case()
    assert torch.autograd.gradcheck(lambda v: segment_sum(v, rows, 5), (values.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, rows), (table.requires_grad_(),))


def test_compiled_equals_eager():
    rows, values, table = _case(1)

    def f(v, t):
        return segment_sum(torch.sigmoid(v) * gather_rows(t, rows), rows, 5).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, dynamic=True)
    for fn in (f, compiled):
        v, t = values.clone().requires_grad_(), table.clone().requires_grad_()
        out = fn(v, t)
        out.backward()
        if fn is f:
            want = (out.detach(), v.grad, t.grad)
        else:
            for a, b in zip((out.detach(), v.grad, t.grad), want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_segment_sum_kernel_float_bits_bf16_rounding_and_unsorted_rows():
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(0, 60, (300,), generator=g)
    rows = torch.repeat_interleave(torch.arange(300), lengths)
    values = torch.randn(rows.numel(), 80, generator=g)
    # float: index_add_'s sum bit for bit (both add a row's values in order)
    want = values.new_zeros(300, 80).index_add_(0, rows, values)
    assert torch.equal(segment_sum(values, rows, 300), want)
    # bfloat16: summed in float, rounded once: within half a bf16 ulp of the float64 sum
    exact = values.bfloat16().double().new_zeros(300, 80).index_add_(0, rows, values.bfloat16().double())
    got = segment_sum(values.bfloat16(), rows, 300).double()
    assert torch.all((got - exact).abs() <= exact.abs() * 2.0**-8 + 1e-30)
    with pytest.raises(RuntimeError, match="nondecreasing"):
        segment_sum(values[:3], torch.tensor([1, 0, 2]), 300)

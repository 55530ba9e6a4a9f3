"""trainer.models.jagged: the row gather and segment sum against numpy loops, their backward by
finite differences (gradcheck, float64), and the same values and gradients through torch.compile."""

import numpy as np
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

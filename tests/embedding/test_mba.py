"""The MBA update rule against a numpy loop over rows implementing DIN Eq. 7 (and Adagrad + MBA)."""

import numpy as np
import pytest
import torch

from embedding.mba import mba_rowwise_adagrad_, mba_sgd_


def numpy_step(w, s, n, rows, grads, lr, lam, adagrad, eps=1e-8):
    w, s = w.astype(np.float64).copy(), s.astype(np.float64).copy()
    for j in sorted(set(rows.tolist())):
        g = grads[rows == j].astype(np.float64).sum(0) + lam * w[j] / max(n[j], 1)
        if adagrad:
            s[j] += (g * g).mean()
            w[j] = w[j] - lr * g / (np.sqrt(s[j]) + eps)
        else:
            w[j] = w[j] - lr * g
    return w, s


@pytest.mark.parametrize("adagrad", [False, True])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_update_matches_eq7_over_several_steps(adagrad, lam):
    rng = np.random.default_rng(0)
    R, D = 50, 8
    w0 = rng.standard_normal((R, D)).astype(np.float32)
    n = rng.integers(1, 20, R).astype(np.int32)
    weight, state = torch.tensor(w0), torch.zeros(R)
    ref_w, ref_s = w0.astype(np.float64), np.zeros(R)
    touched = set()
    for _ in range(5):
        rows = rng.integers(0, 30, 40)  # rows >= 30 are never touched; repeats within the batch
        rows[:5] = rows[0]
        grads = rng.standard_normal((40, D)).astype(np.float32)
        touched |= set(rows.tolist())
        if adagrad:
            mba_rowwise_adagrad_(weight, state, torch.tensor(n), torch.tensor(rows), torch.tensor(grads), 0.1, lam)
        else:
            mba_sgd_(weight, torch.tensor(n), torch.tensor(rows), torch.tensor(grads), 0.1, lam)
        ref_w, ref_s = numpy_step(ref_w, ref_s, n, rows, grads, 0.1, lam, adagrad)
        np.testing.assert_allclose(weight.numpy(), ref_w, rtol=1e-5, atol=1e-6)
    untouched = sorted(set(range(R)) - touched)
    assert untouched and np.array_equal(weight.numpy()[untouched], w0[untouched])  # bit-identical


"""The MBA row update (torch ops and Triton) against a numpy loop over rows implementing DIN Eq. 7
(and row-wise Adagrad + MBA), and the online sample counts against a per-sample Python count."""

import numpy as np
import pytest
import torch

from embedding import mba


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


def run_update(kernel, weight, state, n, rows, grads, lr, lam, adagrad):
    """Hand the kernel its contract: each occurrence names its row of a gradient matrix, here the
    [N, D] gradients stored in a shuffled order to check the indirection."""
    dev = weight.device
    perm = np.random.default_rng(1).permutation(len(rows))
    stored = torch.tensor(grads[perm], device=dev)  # stored[k] = grads[perm[k]]
    where = np.empty_like(perm)
    where[perm] = np.arange(len(perm))
    seg = mba.segments(torch.tensor(rows, device=dev), torch.tensor(where, device=dev), weight.shape[0])
    kernel(weight, state if adagrad else None, torch.tensor(n, device=dev), seg, stored, lr, lam, 1e-8)


# Triton is a test dependency: its kernel runs here in the interpreter (tests/conftest.py); on a
# GPU machine (TRITON_INTERPRET=0) the cuda cases run it compiled.
KERNELS = {"torch": mba.update_rows_torch, "triton": mba.update_rows_triton, "cpp": mba.update_rows_cpp}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
CASES = [("cpu", k) for k in sorted(KERNELS)] + [pytest.param("cuda", k, marks=CUDA) for k in ("torch", "triton")]


@pytest.mark.parametrize("device,kernel", CASES)
@pytest.mark.parametrize("adagrad", [False, True])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_update_matches_eq7_over_several_steps(device, kernel, adagrad, lam):
    rng = np.random.default_rng(0)
    R, D = 50, 12  # D not a power of two: the Triton kernel masks its columns
    w0 = rng.standard_normal((R, D)).astype(np.float32)
    n = rng.integers(1, 20, R).astype(np.int32)
    n[3] = 0  # a row never counted (e.g. stale counts) is divided by 1, not 0
    weight, state = torch.tensor(w0, device=device), torch.zeros(R, device=device)
    ref_w, ref_s = w0.astype(np.float64), np.zeros(R)
    touched = set()
    for step in range(4):
        rows = rng.integers(0, 30, 40 if step else 400)  # rows >= 30 are never touched
        rows[:5] = rows[0]  # repeats within the batch; the first batch has rows with > 32 occurrences
        rows[5] = 3
        grads = rng.standard_normal((len(rows), D)).astype(np.float32)
        touched |= set(rows.tolist())
        run_update(KERNELS[kernel], weight, state, n, rows, grads, 0.1, lam, adagrad)
        ref_w, ref_s = numpy_step(ref_w, ref_s, n, rows, grads, 0.1, lam, adagrad)
        np.testing.assert_allclose(weight.cpu().numpy(), ref_w, rtol=1e-5, atol=1e-5)
        if adagrad:
            np.testing.assert_allclose(state.cpu().numpy(), ref_s, rtol=1e-5, atol=1e-6)
    untouched = sorted(set(range(R)) - touched)
    assert untouched and np.array_equal(weight.cpu().numpy()[untouched], w0[untouched])  # bit-identical


@pytest.mark.parametrize("device,kernel", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_storage_fp32_math(device, kernel, dtype):
    """fp16/bf16 rows: the update is computed in fp32 from the stored value and rounded once."""
    rng = np.random.default_rng(2)
    R, D = 20, 8
    w0 = torch.tensor(rng.standard_normal((R, D)), dtype=dtype, device=device)
    n = rng.integers(1, 5, R).astype(np.int32)
    rows = rng.integers(0, R, 30)
    grads = rng.standard_normal((30, D)).astype(np.float32)
    weight = w0.clone()
    run_update(KERNELS[kernel], weight, None, n, rows, grads, 0.1, 0.3, False)
    ref, _ = numpy_step(w0.float().cpu().numpy(), np.zeros(R), n, rows, grads, 0.1, 0.3, False)
    np.testing.assert_allclose(weight.float().cpu().numpy(), torch.tensor(ref).to(dtype).float().numpy(),
                               rtol=1e-2, atol=1e-2)
    assert weight.dtype == dtype


def test_online_counts_count_samples_not_occurrences():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 10, 200)
    samples = np.sort(rng.integers(0, 16, 200))
    counts = torch.zeros(12, dtype=torch.int32)
    mba.count_samples_(counts, torch.tensor(ids), torch.tensor(samples))
    expected = np.zeros(12, dtype=np.int64)
    for s in set(samples.tolist()):
        for j in set(ids[samples == s].tolist()):
            expected[j] += 1
    np.testing.assert_array_equal(counts.numpy(), expected)
    assert counts.dtype == torch.int32 and counts.element_size() == 4  # MBA state: 4 bytes per row

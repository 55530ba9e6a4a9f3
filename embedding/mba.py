"""Mini-batch-aware L2 regularization (DIN paper §4.3.1, Eq. 5–7): the fused row update.

For every row j touched by the batch, one pass over the unique touched rows:

    SGD:      w_j ← w_j − η·(ḡ_j + λ·w_j/n_j)                                   (Eq. 7)
    Adagrad:  g'_j = ḡ_j + λ·w_j/n_j;  s_j ← s_j + mean(g'_j²);  w_j ← w_j − η·g'_j/(√s_j + ε)

ḡ_j is the sum of the gradients of all occurrences of row j in the batch (the loss is already the
global-batch mean, so this sum is the mean gradient of Eq. 7), taken at the weights *before* the
step. Rows not touched are not written. λ = 0 is plain SGD / row-wise Adagrad (FBGEMM's
EXACT_SGD / EXACT_ROWWISE_ADAGRAD).

The gradient is never materialized per lookup: an occurrence is a row index `src` into a [M, D]
gradient matrix (a pooled table: one row per sample and feature; a sequence table: one row per
lookup), and the occurrences of a row are summed straight from there. Three implementations of
the same contract:

- `update_rows_cpp`: a C++ loop over the touched rows split over the CPU threads (the CPU default);
- `update_rows_torch`: the sums as one CSR × dense product, then the row update in vectorized
  torch ops (CPU, and CUDA without Triton);
- `update_rows_triton`: one Triton program per touched row that sums its occurrences and updates
  it (GPU; on the CPU under TRITON_INTERPRET=1, which is how CI checks its exactness).

Weights may be stored in fp32, fp16 or bf16; the math is fp32 in both.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

try:  # Triton is optional on the CPU (tests run it under TRITON_INTERPRET=1).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None


@dataclass(frozen=True)
class Segments:
    """The touched rows of one table in a batch and where their gradients are.

    rows [U] (sorted, unique) and offsets [U+1] into src [N]: the occurrences of rows[u] read the
    gradient rows grad[src[offsets[u]:offsets[u+1]]] of a [M, D] gradient matrix.
    """

    rows: torch.Tensor
    offsets: torch.Tensor
    src: torch.Tensor


def segments(ids: torch.Tensor, src: torch.Tensor, num_rows: int) -> Segments:
    """Group the occurrences (ids [N] < num_rows, src [N]) by row: one sort, no per-row Python."""
    # A table shard has < 2^31 rows in practice: sorting int32 keys is twice as fast.
    keys = ids.to(torch.int32) if num_rows < 2**31 else ids
    ids_sorted, perm = torch.sort(keys, stable=True)
    rows, counts = torch.unique_consecutive(ids_sorted, return_counts=True)
    offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return Segments(rows.to(torch.int64), offsets, src.index_select(0, perm))


def summed_gradients(seg: Segments, grad: torch.Tensor) -> torch.Tensor:
    """[U, D] fp32: for each touched row the sum of its occurrences' gradient rows, as one sparse
    (CSR, U × M) by dense (M × D) product, without materializing a per-occurrence gradient."""
    ones = torch.ones(seg.src.numel(), dtype=torch.float32, device=grad.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        s = torch.sparse_csr_tensor(seg.offsets, seg.src, ones, size=(seg.rows.numel(), grad.shape[0]),
                                    check_invariants=False)
        return s @ grad.float()


def update_rows_torch(weight: torch.Tensor, momentum: torch.Tensor | None, counts: torch.Tensor,
                      seg: Segments, grad: torch.Tensor, lr: float, lam: float, eps: float) -> None:
    """MBA SGD (momentum None) or row-wise Adagrad on the rows of `seg`, in place; grad [M, D].

    In-place ops on [U, D] buffers (fresh large temporaries cost more than the arithmetic on CPU).
    """
    if seg.rows.numel() == 0:
        return
    g = summed_gradients(seg, grad)  # [U, D] fp32, ḡ
    w = weight.index_select(0, seg.rows).float()
    if lam:
        decay = counts.index_select(0, seg.rows).float().clamp_min_(1.0).reciprocal_().mul_(lam).unsqueeze(1)
        g.addcmul_(w, decay)  # g' = ḡ + λ·w/n
    if momentum is None:
        w.add_(g, alpha=-lr)
    else:
        s = momentum.index_select(0, seg.rows).add_(g.square().mean(1))
        momentum.index_copy_(0, seg.rows, s)
        w.addcmul_(g, s.sqrt_().add_(eps).reciprocal_().mul_(-lr).unsqueeze(1))
    weight.index_copy_(0, seg.rows, w.to(weight.dtype))


if triton is not None:

    @triton.jit
    def _mba_rows_kernel(weight_ptr, momentum_ptr, counts_ptr, rows_ptr, offsets_ptr, src_ptr, grad_ptr,
                         lr, lam, eps, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                         ADAGRAD: tl.constexpr):
        u = tl.program_id(0)
        row = tl.load(rows_ptr + u).to(tl.int64)
        start = tl.load(offsets_ptr + u)
        end = tl.load(offsets_ptr + u + 1)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        # occurrences BLOCK_K at a time: a hot (Zipf head) row gathers many gradient rows at once
        acc2 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < end
            s = tl.load(src_ptr + ks, mask=kmask, other=0).to(tl.int64)
            g = tl.load(grad_ptr + s[:, None] * D + cols[None, :], mask=kmask[:, None] & mask[None, :], other=0.0)
            acc2 += g.to(tl.float32)
        acc = tl.sum(acc2, axis=0)
        w = tl.load(weight_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        n = tl.maximum(tl.load(counts_ptr + row).to(tl.float32), 1.0)
        g = acc + lam * w / n
        if ADAGRAD:
            m = tl.load(momentum_ptr + row) + tl.sum(g * g, axis=0) / D
            tl.store(momentum_ptr + row, m)
            w = w - lr * g / (tl.sqrt(m) + eps)
        else:
            w = w - lr * g
        tl.store(weight_ptr + row * D + cols, w.to(weight_ptr.dtype.element_ty), mask=mask)


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, and on the CPU only in its interpreter (TRITON_INTERPRET=1 set before
    triton is imported)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def update_rows_triton(weight: torch.Tensor, momentum: torch.Tensor | None, counts: torch.Tensor,
                       seg: Segments, grad: torch.Tensor, lr: float, lam: float, eps: float) -> None:
    """Same contract as update_rows_torch: one Triton program per touched row."""
    if seg.rows.numel() == 0:
        return
    if not weight.is_contiguous() or not grad.is_contiguous():
        raise ValueError("MBA Triton update: weight and gradient must be contiguous")
    d = weight.shape[1]
    block_d = triton.next_power_of_2(d)
    mom = momentum if momentum is not None else counts  # unused pointer when not ADAGRAD
    _mba_rows_kernel[(seg.rows.numel(),)](
        weight, mom, counts, seg.rows, seg.offsets, seg.src, grad, float(lr), float(lam), float(eps),
        D=d, BLOCK_D=block_d, BLOCK_K=max(1, min(32, 2048 // block_d)), ADAGRAD=momentum is not None)


@functools.cache
def cpu_extension():
    """The C++ CPU kernel (embedding/csrc/mba_cpu.cpp), compiled on first use and cached by torch
    (`make setup` builds it ahead: `python -m embedding.mba`)."""
    from torch.utils import cpp_extension

    src = Path(__file__).with_name("csrc") / "mba_cpu.cpp"
    return cpp_extension.load(name="dinrec_mba_cpu", sources=[str(src)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def update_rows_cpp(weight: torch.Tensor, momentum: torch.Tensor | None, counts: torch.Tensor, seg: Segments,
                    grad: torch.Tensor, lr: float, lam: float, eps: float) -> None:
    """Same contract: one pass per touched row in C++, rows split over the CPU threads."""
    if seg.rows.numel() == 0:
        return
    cpu_extension().update_rows(weight, momentum, counts, seg.rows, seg.offsets, seg.src,
                                grad.float().contiguous(), lr, lam, eps)


def update_rows(weight: torch.Tensor, momentum: torch.Tensor | None, counts: torch.Tensor, seg: Segments,
                grad: torch.Tensor, lr: float, lam: float, eps: float) -> None:
    """The fused update on the device's best implementation: Triton on CUDA (torch ops without
    Triton), the C++ kernel on the CPU. The Triton interpreter on the CPU is for exactness
    checks, not for speed."""
    if weight.device.type == "cuda":
        fn = update_rows_triton if triton is not None else update_rows_torch
    else:
        fn = update_rows_cpp
    fn(weight, momentum, counts, seg, grad, lr, lam, eps)


KERNELS = {"auto": update_rows, "torch": update_rows_torch, "triton": update_rows_triton, "cpp": update_rows_cpp}


def count_samples_(counts: torch.Tensor, ids: torch.Tensor, samples: torch.Tensor) -> None:
    """Online n_j: add, for every row, the number of distinct samples of this batch that look it up
    (ids [N] with the sample of each lookup in samples [N]; repeats within a sample count once)."""
    if ids.numel() == 0:
        return
    rows = counts.numel()
    pairs = torch.unique(samples.to(torch.int64) * rows + ids)
    counts.index_add_(0, pairs % rows, torch.ones_like(pairs, dtype=counts.dtype))


if __name__ == "__main__":  # `python -m embedding.mba`: build the C++ kernel ahead of the first run
    cpu_extension()
    print("embedding.mba: C++ CPU kernel built")

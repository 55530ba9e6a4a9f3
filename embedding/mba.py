"""Mini-batch-aware L2 regularization (DIN paper §5.1, Eq. 5–7), the CPU update.

For every row j touched by the batch, in one pass over the unique touched rows:

    SGD:      w_j ← w_j − η·(ḡ_j + λ·w_j/n_j)                                   (Eq. 7)
    Adagrad:  g'_j = ḡ_j + λ·w_j/n_j;  s_j ← s_j + mean(g'_j²);  w_j ← w_j − η·g'_j/(√s_j + ε)

ḡ_j is the sum of the gradients of all occurrences of row j (the loss is already the global-batch
mean, so this sum is the mean gradient of Eq. 7), taken at the weights *before* the step. Rows
not touched are not written. λ = 0 is plain SGD / row-wise Adagrad.

This is the update rule on one shard's rows; hooking it into torchrec's sharded kernels (and the
GPU Triton version) is the rest of the MBA work.
"""

from __future__ import annotations

import torch


def _touched(rows: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique rows and their summed gradients: rows [N], grads [N, D] -> [U], [U, D]."""
    uniq, inverse = torch.unique(rows, return_inverse=True)
    summed = grads.new_zeros(uniq.numel(), grads.shape[1]).index_add_(0, inverse, grads)
    return uniq, summed


@torch.no_grad()
def mba_sgd_(weight: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor,
             lr: float, lam: float) -> None:
    """Eq. 7 in place on `weight` [R, D] for the rows looked up in this batch.

    counts [R]: n_j (samples that look row j up); rows [N]: the row of each lookup; grads [N, D]:
    d(loss)/d(embedding) of each lookup.
    """
    uniq, g = _touched(rows, grads)
    w = weight.index_select(0, uniq)
    n = counts.index_select(0, uniq).to(w.dtype).clamp_min(1).unsqueeze(1)
    if lam:
        g = g + lam * w / n
    weight.index_copy_(0, uniq, w - lr * g)


@torch.no_grad()
def mba_rowwise_adagrad_(weight: torch.Tensor, state: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor,
                         grads: torch.Tensor, lr: float, lam: float, eps: float = 1e-8) -> None:
    """Row-wise Adagrad with the MBA term added to the gradient; state [R] holds Σ mean(g'²)."""
    uniq, g = _touched(rows, grads)
    w = weight.index_select(0, uniq)
    n = counts.index_select(0, uniq).to(w.dtype).clamp_min(1).unsqueeze(1)
    if lam:
        g = g + lam * w / n
    s = state.index_select(0, uniq) + (g * g).mean(1)
    state.index_copy_(0, uniq, s)
    weight.index_copy_(0, uniq, w - lr * g / (s.sqrt().unsqueeze(1) + eps))

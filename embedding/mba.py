"""Mini-batch-aware L2 regularization (DIN paper §4.3.1, Eq. 5–7): the fused row update.

For every row j touched by the batch, one pass over the unique touched rows:

    SGD:      w_j ← w_j − η·(ḡ_j + λ·w_j/n_j)                                   (Eq. 7)
    Adagrad:  g'_j = ḡ_j + λ·w_j/n_j;  s_j ← s_j + mean(g'_j²);  w_j ← w_j − η·g'_j/(√s_j + ε)

ḡ_j is the sum of the gradients of all occurrences of row j in the batch (the loss is already the
global-batch mean, so this sum is the mean gradient of Eq. 7), taken at the weights *before* the
step. Rows not touched are not written. λ = 0 is plain SGD / row-wise Adagrad (FBGEMM's
EXACT_SGD / EXACT_ROWWISE_ADAGRAD).

The gradients are never materialized per lookup on the GPU: an occurrence is an element offset
`src` into the flattened upstream gradient (`grad_output`), and the Triton kernel sums the
occurrences of its row straight from there. Two implementations of the same contract:

- `update_rows_torch`: vectorized torch ops (CPU, and the GPU fallback without Triton);
- `update_rows_triton`: one Triton program per touched row (GPU; on the CPU under
  TRITON_INTERPRET=1, which is how CI checks its exactness).

Weights may be stored in fp32, fp16 or bf16; the math is fp32 in both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # Triton is optional on the CPU (tests run it under TRITON_INTERPRET=1).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None


@dataclass(frozen=True)
class Segments:
    """The touched rows of one table in a batch and where their occurrences are.

    rows [U] (sorted, unique), offsets [U+1] into `src` [N]: occurrence k of row rows[u] reads the
    gradient at grad_output.flatten()[src[offsets[u] + k] : ... + D].
    """

    rows: torch.Tensor
    offsets: torch.Tensor
    src: torch.Tensor


def segments(ids: torch.Tensor, src: torch.Tensor) -> Segments:
    """Group the occurrences (ids [N], src [N]) by row: one sort, no per-row Python."""
    ids_sorted, perm = torch.sort(ids, stable=True)
    rows, counts = torch.unique_consecutive(ids_sorted, return_counts=True)
    offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return Segments(rows, offsets, src.index_select(0, perm))


def update_rows_torch(weight: torch.Tensor, momentum: torch.Tensor | None, counts: torch.Tensor,
                      seg: Segments, grad_flat: torch.Tensor, lr: float, lam: float, eps: float) -> None:
    """MBA SGD (momentum None) or row-wise Adagrad on the rows of `seg`, in place."""
    d = weight.shape[1]
    if seg.rows.numel() == 0:
        return
    n_occ = seg.offsets[1:] - seg.offsets[:-1]
    which = torch.repeat_interleave(torch.arange(seg.rows.numel(), device=weight.device), n_occ)
    cols = torch.arange(d, device=weight.device)
    g_occ = grad_flat[seg.src.unsqueeze(1) + cols].float()
    g = torch.zeros(seg.rows.numel(), d, dtype=torch.float32, device=weight.device).index_add_(0, which, g_occ)
    w = weight.index_select(0, seg.rows).float()
    if lam:
        n = counts.index_select(0, seg.rows).float().clamp_min(1.0).unsqueeze(1)
        g = g + lam * w / n
    if momentum is None:
        w = w - lr * g
    else:
        s = momentum.index_select(0, seg.rows) + (g * g).mean(1)
        momentum.index_copy_(0, seg.rows, s)
        w = w - lr * g / (s.sqrt().unsqueeze(1) + eps)
    weight.index_copy_(0, seg.rows, w.to(weight.dtype))


if triton is not None:

    @triton.jit
    def _mba_rows_kernel(weight_ptr, momentum_ptr, counts_ptr, rows_ptr, offsets_ptr, src_ptr, grad_ptr,
                         lr, lam, eps, D: tl.constexpr, BLOCK_D: tl.constexpr, ADAGRAD: tl.constexpr):
        u = tl.program_id(0)
        row = tl.load(rows_ptr + u).to(tl.int64)
        start = tl.load(offsets_ptr + u)
        end = tl.load(offsets_ptr + u + 1)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in range(start, end):
            s = tl.load(src_ptr + k)
            acc += tl.load(grad_ptr + s + cols, mask=mask, other=0.0).to(tl.float32)
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
                       seg: Segments, grad_flat: torch.Tensor, lr: float, lam: float, eps: float) -> None:
    """Same contract as update_rows_torch: one Triton program per touched row."""
    if seg.rows.numel() == 0:
        return
    if not weight.is_contiguous() or not grad_flat.is_contiguous():
        raise ValueError("MBA Triton update: weight and grad_output must be contiguous")
    d = weight.shape[1]
    mom = momentum if momentum is not None else counts  # unused pointer when not ADAGRAD
    _mba_rows_kernel[(seg.rows.numel(),)](
        weight, mom, counts, seg.rows, seg.offsets, seg.src, grad_flat, float(lr), float(lam), float(eps),
        D=d, BLOCK_D=triton.next_power_of_2(d), ADAGRAD=momentum is not None)


def update_rows(weight: torch.Tensor, momentum: torch.Tensor | None, counts: torch.Tensor, seg: Segments,
                grad_flat: torch.Tensor, lr: float, lam: float, eps: float) -> None:
    """The fused update on the device's best implementation: Triton on CUDA, else torch ops (the
    Triton interpreter on the CPU is for exactness checks, not for speed)."""
    fn = update_rows_triton if weight.device.type == "cuda" and triton is not None else update_rows_torch
    fn(weight, momentum, counts, seg, grad_flat, lr, lam, eps)


def count_samples_(counts: torch.Tensor, ids: torch.Tensor, samples: torch.Tensor) -> None:
    """Online n_j: add, for every row, the number of distinct samples of this batch that look it up
    (ids [N] with the sample of each lookup in samples [N]; repeats within a sample count once)."""
    if ids.numel() == 0:
        return
    rows = counts.numel()
    pairs = torch.unique(samples.to(torch.int64) * rows + ids)
    counts.index_add_(0, pairs % rows, torch.ones_like(pairs, dtype=counts.dtype))

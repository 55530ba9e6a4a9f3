"""Mini-batch-aware L2 regularization (DIN paper §4.3.1, Eq. 5–7): the fused row update.

For every row j touched by the batch, one pass over the unique touched rows:

    SGD:      w_j ← w_j − η·(ḡ_j + λ·w_j/n_j)                                   (Eq. 7)
    Adagrad:  g'_j = ḡ_j + λ·w_j/n_j;  s_j ← s_j + mean(g'_j²);  w_j ← w_j − η·g'_j/(√s_j + ε)

ḡ_j is the sum of the gradients of all occurrences of row j in the batch (the loss is already the
global-batch mean, so this sum is the mean gradient of Eq. 7), taken at the weights *before* the
step. Rows not touched are not written. λ = 0 is plain SGD / row-wise Adagrad (FBGEMM's
EXACT_SGD / EXACT_ROWWISE_ADAGRAD).

Layout (as in FBGEMM's table-batched modules): the tables of a group share one flat weight
storage, one flat row-wise Adagrad state and one flat count array; their rows are numbered in one
linear space (`TableLayout`). A batch is a list of occurrences: the linear row, and the element
offset `src` of its gradient (its D_t values) in the flat upstream gradient (pooled: the sample's
row of the feature's columns; sequence: the lookup's own row). The gradient is never
materialized per lookup. Two kernels, one contract:

- `update_rows_cpp` (CPU): C++, the touched rows split over the threads, each row summed and
  updated in one pass (embedding/csrc/mba_cpu.cpp);
- `update_rows_triton` (GPU; on the CPU under TRITON_INTERPRET=1, which is how CI checks it): no
  host sync. After the sort, a kernel flags where rows and chunks (at most CHUNK occurrences of
  one row) start, one scan numbers them, a kernel scatters their start positions; then one
  program per chunk sums its occurrences (a Zipf-head row with thousands of occurrences is summed
  by many programs, deterministically, no atomics) and one program per touched row adds its chunk
  sums and applies the update. Grids are sized by the occurrence count; programs past the
  device-side row and chunk totals return at once.

Weights may be stored in fp32, fp16 or bf16; the math is fp32.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

try:  # Triton is optional on the CPU (tests run it under TRITON_INTERPRET=1).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

CHUNK = 128  # occurrences summed by one program of the Triton kernel's first pass


@dataclass
class TableLayout:
    """A group of tables in flat storages. Per table t (int64 tensors on the tables' device):
    linear rows row_off[t] .. row_off[t+1]-1, dim dims[t], row 0 at element w_off[t] of `weight`
    and at m_off[t] of `momentum` (row-wise Adagrad, or None for SGD). `counts` (int32, n_j)
    is indexed by linear row."""

    weight: torch.Tensor
    momentum: torch.Tensor | None
    counts: torch.Tensor
    row_off: torch.Tensor
    w_off: torch.Tensor
    m_off: torch.Tensor
    dims: torch.Tensor
    max_dim: int

    @property
    def num_rows(self) -> int:
        return self.counts.numel()

    @staticmethod
    def of(weights: list[torch.Tensor], momenta: list[torch.Tensor] | None, counts: torch.Tensor) -> TableLayout:
        """From per-table views [rows_t, D_t] (and [rows_t]) that share one storage each, as
        FBGEMM's split_embedding_weights() / get_optimizer_state() return them."""
        dev = weights[0].device
        for w in weights:
            if w.untyped_storage().data_ptr() != weights[0].untyped_storage().data_ptr() or not w.is_contiguous():
                raise ValueError("MBA: the tables of a group must be contiguous views of one storage")
        rows = [w.shape[0] for w in weights]
        row_off = torch.tensor([0] + rows, dtype=torch.int64).cumsum(0)
        if int(row_off[-1]) != counts.numel():
            raise ValueError(f"MBA: {counts.numel()} counts for {int(row_off[-1])} rows")
        flat = weights[0].new_empty(0).set_(weights[0].untyped_storage())
        mom = None
        m_off = [0] * len(weights)
        if momenta is not None:
            mom = momenta[0].new_empty(0).set_(momenta[0].untyped_storage())
            m_off = [m.storage_offset() for m in momenta]

        def dev_tensor(x):
            return torch.tensor(x, dtype=torch.int64, device=dev)

        return TableLayout(weight=flat, momentum=mom, counts=counts, row_off=row_off.to(dev),
                           w_off=dev_tensor([w.storage_offset() for w in weights]), m_off=dev_tensor(m_off),
                           dims=dev_tensor([w.shape[1] for w in weights]), max_dim=max(w.shape[1] for w in weights))


@dataclass(frozen=True)
class Segments:
    """The touched rows of a batch: rows [U] (linear, sorted, unique), the table of each row
    tab [U], and offsets [U+1] into src [N] (the occurrences' gradient offsets, grouped by row)."""

    rows: torch.Tensor
    tab: torch.Tensor
    offsets: torch.Tensor
    src: torch.Tensor


def sort_rows(lin: torch.Tensor, layout: TableLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The occurrences' linear rows sorted (stable), and the permutation that sorts them."""
    # A group has < 2^31 rows in practice: sorting int32 keys is about twice as fast.
    return torch.sort(lin.to(torch.int32) if layout.num_rows < 2**31 else lin, stable=True)


def segments(lin: torch.Tensor, src: torch.Tensor, layout: TableLayout) -> Segments:
    """Group the occurrences (linear rows lin [N], gradient offsets src [N]) by row: one sort."""
    lin_sorted, perm = sort_rows(lin, layout)
    rows, counts = torch.unique_consecutive(lin_sorted, return_counts=True)
    rows = rows.to(torch.int64)
    offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=lin.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    tab = torch.searchsorted(layout.row_off, rows, right=True) - 1
    return Segments(rows, tab, offsets, src.index_select(0, perm))


def count_samples_(counts: torch.Tensor, lin: torch.Tensor, samples: torch.Tensor) -> None:
    """Online n_j: add, for every row, the number of distinct samples of this batch that look it up
    (rows lin [N] with the sample of each lookup in samples [N]; repeats within a sample count once)."""
    if lin.numel() == 0:
        return
    rows = counts.numel()
    pairs = torch.unique(samples.to(torch.int64) * rows + lin)
    counts.index_add_(0, pairs % rows, torch.ones_like(pairs, dtype=counts.dtype))


# ---- CPU: C++ ------------------------------------------------------------------------------------
@functools.cache
def cpu_extension():
    """The C++ CPU kernel (embedding/csrc/mba_cpu.cpp), compiled on first use and cached by torch
    (`make setup` builds it ahead: `python -m embedding.mba`)."""
    from trainer import cpp

    return cpp.load(Path(__file__).with_name("csrc") / "mba_cpu.cpp", "dinrec_mba_cpu", ("-fopenmp",))


# ---- GPU: Triton ---------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _table_of(row, row_off_ptr, T: tl.constexpr, BLOCK_T: tl.constexpr):
        """The table a linear row belongs to: the number of tables that start at or before it, − 1."""
        ts = tl.arange(0, BLOCK_T)
        starts = tl.load(row_off_ptr + 1 + ts, mask=ts < T - 1, other=0x7FFFFFFFFFFFFFFF)
        return tl.sum((row >= starts).to(tl.int64), axis=0)

    @triton.jit
    def _flags_kernel(keys_ptr, flags_ptr, n, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """flags[0, i]: a row starts at sorted position i; flags[1, i]: a chunk starts there (a row
        start, or a multiple of CHUNK: a chunk never spans two rows nor more than CHUNK positions)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        k = tl.load(keys_ptr + i, mask=m, other=0)
        prev = tl.load(keys_ptr + i - 1, mask=m & (i > 0), other=0)
        start = (i == 0) | (k != prev)
        tl.store(flags_ptr + i, start.to(tl.int32), mask=m)
        tl.store(flags_ptr + n + i, (start | (i % CHUNK == 0)).to(tl.int32), mask=m)

    @triton.jit
    def _scatter_kernel(ids_ptr, seg_pos_ptr, seg_chunk_ptr, chunk_pos_ptr, totals_ptr, n, BLOCK: tl.constexpr):
        """From the inclusive scans ids[0] (rows) and ids[1] (chunks): where each row and chunk
        starts, the first chunk of each row, and sentinels one past the last; totals = (U, C)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        seg = tl.load(ids_ptr + i, mask=m, other=0)
        chunk = tl.load(ids_ptr + n + i, mask=m, other=0)
        prev_seg = tl.load(ids_ptr + i - 1, mask=m & (i > 0), other=0)
        prev_chunk = tl.load(ids_ptr + n + i - 1, mask=m & (i > 0), other=0)
        seg_start = m & (seg != prev_seg)
        chunk_start = m & (chunk != prev_chunk)
        tl.store(seg_pos_ptr + seg - 1, i.to(tl.int64), mask=seg_start)
        tl.store(seg_chunk_ptr + seg - 1, (chunk - 1).to(tl.int64), mask=seg_start)
        tl.store(chunk_pos_ptr + chunk - 1, i.to(tl.int64), mask=chunk_start)
        last = m & (i == n - 1)
        tl.store(seg_pos_ptr + seg, (i + 1).to(tl.int64), mask=last)
        tl.store(seg_chunk_ptr + seg, chunk.to(tl.int64), mask=last)
        tl.store(chunk_pos_ptr + chunk, (i + 1).to(tl.int64), mask=last)
        tl.store(totals_ptr + tl.zeros([BLOCK], tl.int32), seg.to(tl.int64), mask=last)
        tl.store(totals_ptr + 1 + tl.zeros([BLOCK], tl.int32), chunk.to(tl.int64), mask=last)

    @triton.jit
    def _chunk_sums_kernel(partial_ptr, chunk_pos_ptr, totals_ptr, keys_ptr, perm_ptr, src_ptr, grad_ptr,
                           row_off_ptr, dims_ptr, T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        """Program c sums the gradients of chunk c's occurrences (≤ CHUNK of one row)."""
        c = tl.program_id(0)
        if c < tl.load(totals_ptr + 1):
            start = tl.load(chunk_pos_ptr + c)
            stop = tl.load(chunk_pos_ptr + c + 1)
            d = tl.load(dims_ptr + _table_of(tl.load(keys_ptr + start).to(tl.int64), row_off_ptr, T, BLOCK_T))
            cols = tl.arange(0, BLOCK_D)
            cmask = cols < d
            acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
            for k0 in range(start, stop, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < stop
                s = tl.load(src_ptr + tl.load(perm_ptr + ks, mask=kmask, other=0), mask=kmask, other=0)
                g = tl.load(grad_ptr + s[:, None] + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc += g.to(tl.float32)
            tl.store(partial_ptr + c.to(tl.int64) * BLOCK_D + cols, tl.sum(acc, axis=0))

    @triton.jit
    def _update_rows_kernel(weight_ptr, momentum_ptr, counts_ptr, keys_ptr, seg_pos_ptr, seg_chunk_ptr, totals_ptr,
                            partial_ptr, row_off_ptr, w_off_ptr, m_off_ptr, dims_ptr, lr, lam, eps,
                            T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ADAGRAD: tl.constexpr):
        """Program u: touched row u adds its chunk sums and takes its MBA step."""
        u = tl.program_id(0)
        if u < tl.load(totals_ptr):
            row = tl.load(keys_ptr + tl.load(seg_pos_ptr + u)).to(tl.int64)
            t = _table_of(row, row_off_ptr, T, BLOCK_T)
            local = row - tl.load(row_off_ptr + t)
            d = tl.load(dims_ptr + t)
            cols = tl.arange(0, BLOCK_D)
            cmask = cols < d
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for c in range(tl.load(seg_chunk_ptr + u), tl.load(seg_chunk_ptr + u + 1)):  # int64 bounds
                acc += tl.load(partial_ptr + c * BLOCK_D + cols)
            base = tl.load(w_off_ptr + t) + local * d
            w = tl.load(weight_ptr + base + cols, mask=cmask, other=0.0).to(tl.float32)
            n = tl.maximum(tl.load(counts_ptr + row).to(tl.float32), 1.0)
            g = acc + lam * w / n
            if ADAGRAD:
                m_idx = tl.load(m_off_ptr + t) + local
                m = tl.load(momentum_ptr + m_idx) + tl.sum(tl.where(cmask, g * g, 0.0), axis=0) / d.to(tl.float32)
                tl.store(momentum_ptr + m_idx, m)
                w = w - lr * g / (tl.sqrt(m) + eps)
            else:
                w = w - lr * g
            tl.store(weight_ptr + base + cols, w.to(weight_ptr.dtype.element_ty), mask=cmask)


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, and on the CPU only in its interpreter (TRITON_INTERPRET=1 set before
    triton is imported)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def update_rows_triton(layout: TableLayout, lin: torch.Tensor, src: torch.Tensor, grad: torch.Tensor, lr: float,
                       lam: float, eps: float) -> None:
    """The Triton path, without a host sync: sort, flag row and chunk starts, one scan, scatter the
    starts, chunk sums, row updates. Grids are sized by the occurrence count N (an upper bound on
    rows and chunks); programs past the device-side totals return at once."""
    n = lin.numel()
    if n == 0:
        return
    if not grad.is_contiguous():
        raise ValueError("MBA Triton update: the gradient must be contiguous")
    dev = lin.device
    keys, perm = sort_rows(lin, layout)
    block = 1024
    flags = torch.empty(2, n, dtype=torch.int32, device=dev)
    _flags_kernel[(triton.cdiv(n, block),)](keys, flags, n, CHUNK=CHUNK, BLOCK=block)
    ids = torch.cumsum(flags, dim=1, dtype=torch.int32)
    seg_pos = torch.empty(n + 1, dtype=torch.int64, device=dev)
    seg_chunk = torch.empty(n + 1, dtype=torch.int64, device=dev)
    chunk_pos = torch.empty(n + 1, dtype=torch.int64, device=dev)
    totals = torch.empty(2, dtype=torch.int64, device=dev)
    _scatter_kernel[(triton.cdiv(n, block),)](ids, seg_pos, seg_chunk, chunk_pos, totals, n, BLOCK=block)
    block_d = triton.next_power_of_2(layout.max_dim)
    n_tables = layout.dims.numel()
    block_t = triton.next_power_of_2(max(n_tables - 1, 1))
    # On the GPU the grids stay at N (no sync); in the CPU interpreter (tests) reading the totals
    # costs nothing and spares it N idle programs.
    rows_grid, chunks_grid = (n, n) if dev.type == "cuda" else tuple(int(x) for x in totals.tolist())
    partial = torch.empty(chunks_grid, block_d, dtype=torch.float32, device=dev)
    _chunk_sums_kernel[(chunks_grid,)](partial, chunk_pos, totals, keys, perm, src, grad, layout.row_off, layout.dims,
                             T=n_tables, BLOCK_T=block_t, BLOCK_K=max(1, min(32, 4096 // block_d)), BLOCK_D=block_d)
    mom = layout.momentum if layout.momentum is not None else layout.counts  # unused unless ADAGRAD
    _update_rows_kernel[(rows_grid,)](layout.weight, mom, layout.counts, keys, seg_pos, seg_chunk, totals, partial,
                              layout.row_off, layout.w_off, layout.m_off, layout.dims, float(lr), float(lam),
                              float(eps), T=n_tables, BLOCK_T=block_t, BLOCK_D=block_d,
                              ADAGRAD=layout.momentum is not None)


def update_rows_cpp(layout: TableLayout, lin: torch.Tensor, src: torch.Tensor, grad: torch.Tensor, lr: float,
                    lam: float, eps: float) -> None:
    """The C++ path: group the occurrences by row (one sort), then one pass per touched row."""
    if lin.numel() == 0:
        return
    seg = segments(lin, src, layout)
    cpu_extension().update_rows(layout.weight, layout.momentum, layout.counts, layout.row_off, layout.w_off,
                                layout.m_off, layout.dims, seg.rows, seg.tab, seg.offsets, seg.src,
                                grad.float().contiguous().reshape(-1), lr, lam, eps)


def update_rows(layout: TableLayout, lin: torch.Tensor, src: torch.Tensor, grad: torch.Tensor, lr: float, lam: float,
                eps: float) -> None:
    """The fused update on the tables' device: Triton on CUDA, C++ on the CPU."""
    fn = update_rows_triton if layout.weight.device.type == "cuda" else update_rows_cpp
    fn(layout, lin, src, grad, lr, lam, eps)


KERNELS = {"auto": update_rows, "cpp": update_rows_cpp, "triton": update_rows_triton}


if __name__ == "__main__":  # `python -m embedding.mba`: build the C++ kernel ahead of the first run
    cpu_extension()
    print("embedding.mba: C++ CPU kernel built")

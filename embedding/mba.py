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
  host sync, one sort and two kernels over chunks of C sorted occurrences. A row whose
  occurrences run on past the end of a chunk leaves there the sum of its occurrences in that
  chunk (`_carry_kernel`); then each chunk sums, by a segmented scan, the rows that end in it,
  adds to its first row the sums left by the chunks before, and updates those rows
  (`_update_kernel`). A Zipf-head row with thousands of occurrences is summed by many programs,
  deterministically, without atomics.

How a batch's lookups become occurrences is `occurrences_torch` (vectorized torch ops, for the
C++ path) or `occurrences_triton` (one kernel: each lookup finds its bag by binary search in the
offsets). On the GPU a step is host-bound, so the Triton path is a few launches: occurrences,
sort, the two kernels.

Weights may be stored in fp32, fp16 or bf16; the math is fp32.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from embedding.tables import jagged_rows

try:  # Triton is optional on the CPU (tests run it under TRITON_INTERPRET=1).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

CHUNK = 128  # sorted occurrences per program of the Triton update (fewer for wide rows: chunk_size)
CARRY_BLOCK = 32  # earlier chunks whose carried sums one step of the Triton update's carry loop reads


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


@dataclass(frozen=True)
class Bags:
    """How a lookup's bag maps to the group: `batch` samples per feature, the bag of feature f and
    sample s is f·batch + s; per feature its table `feature_table` [F] and its first column
    `feature_col` [F] in the pooled [B, ΣD] output (int64, on the tables' device); `pooled`: one
    row per bag in the output (EmbeddingBagCollection), else one row per lookup (EmbeddingCollection)."""

    batch: int
    feature_table: torch.Tensor
    feature_col: torch.Tensor
    pooled: bool


def occurrences_torch(layout: TableLayout, bags: Bags, indices: torch.Tensor, offsets: torch.Tensor, stride: int,
                      samples: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every lookup as an occurrence: its linear row, the element offset of its gradient in the
    upstream gradient (rows of `stride` values), and its sample (if `samples`). Vectorized torch ops."""
    n = indices.numel()
    bag = jagged_rows(offsets[1:] - offsets[:-1], n)
    if bags.feature_table.numel() == 1:  # one feature: the bag is the sample
        sample, table, col = bag, bags.feature_table[0], bags.feature_col[0]
    else:
        feature = bag // bags.batch
        sample = bag - feature * bags.batch
        table, col = bags.feature_table.index_select(0, feature), bags.feature_col.index_select(0, feature)
    lin = indices + layout.row_off[table] if layout.dims.numel() > 1 else indices
    src = sample * stride + col if bags.pooled else torch.arange(n, device=indices.device) * stride
    return lin, src, sample if samples else None


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
        """Per lane: the table of a linear row ([C] int64), the number of tables that start at or
        before it, − 1."""
        ts = tl.arange(0, BLOCK_T)
        starts = tl.load(row_off_ptr + 1 + ts, mask=ts < T - 1, other=0x7FFFFFFFFFFFFFFF)
        return tl.sum((row[:, None] >= starts[None, :]).to(tl.int64), axis=1)

    @triton.jit
    def _segmented_add(a, a_start, b, b_start):
        """Combine of a sum that restarts at every lane flagged as a row start."""
        return tl.where(b_start != 0, b, a + b), a_start | b_start

    @triton.jit
    def _occurrences_kernel(indices_ptr, offsets_ptr, ftm_ptr, row_off_ptr, col_ptr, lin_ptr, src_ptr, sample_ptr,
                            n, n_bags, batch, stride, steps, POOLED: tl.constexpr, LINEARIZE: tl.constexpr,
                            SAMPLES: tl.constexpr, BLOCK: tl.constexpr):
        """Lookup i: its bag (binary search of i in the offsets), hence its feature and sample; its
        linear row; the offset of its gradient (pooled: the sample's row of the feature's columns;
        sequence: the lookup's own row)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        lo = tl.zeros([BLOCK], dtype=tl.int64)
        hi = tl.zeros([BLOCK], dtype=tl.int64) + (n_bags - 1)
        for _ in range(steps):  # the last bag whose offset is <= i
            mid = (lo + hi + 1) // 2
            go = tl.load(offsets_ptr + mid, mask=m, other=0) <= i
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        feature = lo // batch
        sample = lo - feature * batch
        row = tl.load(indices_ptr + i, mask=m, other=0).to(tl.int64)
        if LINEARIZE:
            row += tl.load(row_off_ptr + tl.load(ftm_ptr + feature, mask=m, other=0), mask=m, other=0)
        tl.store(lin_ptr + i, row, mask=m)
        if POOLED:
            src = sample * stride + tl.load(col_ptr + feature, mask=m, other=0)
        else:
            src = i * stride
        tl.store(src_ptr + i, src, mask=m)
        if SAMPLES:
            tl.store(sample_ptr + i, sample, mask=m)

    @triton.jit
    def _rows_at(keys_ptr, pos, valid, DIV):
        """The rows of sorted keys (key = row · DIV + sample) at positions pos; −1 where not valid."""
        return tl.where(valid, (tl.load(keys_ptr + pos, mask=valid, other=0) // DIV).to(tl.int64), -1)

    @triton.jit
    def _carry_kernel(sums_ptr, new_ptr, keys_ptr, perm_ptr, src_ptr, grad_ptr, row_off_ptr, dims_ptr, n, DIV,
                      T: tl.constexpr, BLOCK_T: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr,
                      ONLINE: tl.constexpr):
        """Chunk p (sorted positions p·C .. p·C + C − 1): if its last row goes on into the next
        chunk, the sum of that row's gradients within this chunk, to sums[p] (online counts: and
        the number of its samples that first appear here, to new[p])."""
        p = tl.program_id(0).to(tl.int64)
        nxt = p * C + C
        if nxt < n:
            r_last = (tl.load(keys_ptr + nxt - 1) // DIV).to(tl.int64)
            if (tl.load(keys_ptr + nxt) // DIV).to(tl.int64) == r_last:
                i = p * C + tl.arange(0, C)
                k = tl.load(keys_ptr + i)
                r = (k // DIV).to(tl.int64)
                sel = r == r_last
                d = tl.load(dims_ptr + _table_of(r, row_off_ptr, T, BLOCK_T))
                cols = tl.arange(0, BLOCK_D)
                s = tl.load(src_ptr + tl.load(perm_ptr + i, mask=sel, other=0), mask=sel, other=0)
                g = tl.load(grad_ptr + s[:, None] + cols[None, :], mask=sel[:, None] & (cols[None, :] < d[:, None]),
                            other=0.0)
                tl.store(sums_ptr + p * BLOCK_D + cols, tl.sum(g.to(tl.float32), axis=0))
                if ONLINE:  # a sample is new where the key changes (keys sorted by row, then sample)
                    k_prev = tl.load(keys_ptr + i - 1, mask=i > 0, other=-1)
                    tl.store(new_ptr + p, tl.sum((sel & (k != k_prev)).to(tl.int32), axis=0))

    @triton.jit
    def _update_kernel(weight_ptr, momentum_ptr, counts_ptr, keys_ptr, perm_ptr, src_ptr, grad_ptr, sums_ptr,
                       new_ptr, row_off_ptr, w_off_ptr, m_off_ptr, dims_ptr, n, DIV, lr, lam, eps, T: tl.constexpr,
                       BLOCK_T: tl.constexpr, C: tl.constexpr, CB: tl.constexpr, BLOCK_D: tl.constexpr,
                       ADAGRAD: tl.constexpr, ONLINE: tl.constexpr):
        """Chunk q: every row that ends in it sums its gradients (a segmented scan over the chunk,
        plus, for the chunk's first row, the sums that _carry_kernel left in earlier chunks) and
        takes its MBA step; with online counts, its n_j first grows by the row's samples in the
        batch, counted the same way."""
        q = tl.program_id(0).to(tl.int64)
        i = q * C + tl.arange(0, C)
        m = i < n
        row = _rows_at(keys_ptr, i, m, DIV)
        r_prev = _rows_at(keys_ptr, i - 1, m & (i > 0), DIV)
        ends = m & (row != _rows_at(keys_ptr, i + 1, i + 1 < n, DIV))
        # the chunk's last row, if it goes on into the next chunk, is summed there (its lanes skipped)
        nxt = q * C + C
        r_last = (tl.load(keys_ptr + tl.minimum(nxt, n) - 1) // DIV).to(tl.int64)
        r_after = tl.where(nxt < n, (tl.load(keys_ptr + nxt, mask=nxt < n, other=0) // DIV).to(tl.int64), -1)
        need = tl.where(r_after == r_last, m & (row != r_last), m)
        t = _table_of(row, row_off_ptr, T, BLOCK_T)
        d = tl.load(dims_ptr + t, mask=m, other=1)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols[None, :] < d[:, None]
        s = tl.load(src_ptr + tl.load(perm_ptr + i, mask=need, other=0), mask=need, other=0)
        g = tl.load(grad_ptr + s[:, None] + cols[None, :], mask=need[:, None] & cmask, other=0.0).to(tl.float32)
        starts = ((row != r_prev) | (i == q * C)).to(tl.int32)
        acc, _ = tl.associative_scan((g, tl.broadcast_to(starts[:, None], (C, BLOCK_D))), 0, _segmented_add)
        if ONLINE:  # samples of the batch per row: keys sorted by row then sample, a new sample where the key changes
            k = tl.load(keys_ptr + i, mask=m, other=-1)
            new = (m & (k != tl.load(keys_ptr + i - 1, mask=m & (i > 0), other=-1))).to(tl.int32)
            seen, _ = tl.associative_scan((new, starts), 0, _segmented_add)
        else:
            seen = tl.zeros([C], dtype=tl.int32)
        # the chunk's first row began in earlier chunks: add what they carried, CB chunks at a time
        r0 = (tl.load(keys_ptr + q * C) // DIV).to(tl.int64)
        carry = tl.zeros([BLOCK_D], dtype=tl.float32)
        carry_seen = tl.sum(tl.zeros([CB], dtype=tl.int32), axis=0)
        if (q > 0) & ((r_after != r_last) | (r_last != r0)):
            if (tl.load(keys_ptr + q * C - 1) // DIV).to(tl.int64) == r0:
                j = q - 1
                more = r0 == r0
                while more:
                    js = j - tl.arange(0, CB)
                    hit = (js >= 0) & (_rows_at(keys_ptr, js * C + C - 1, js >= 0, DIV) == r0)
                    carry += tl.sum(tl.load(sums_ptr + js[:, None] * BLOCK_D + cols[None, :], mask=hit[:, None],
                                            other=0.0), axis=0)
                    if ONLINE:
                        carry_seen += tl.sum(tl.load(new_ptr + js, mask=hit, other=0), axis=0)
                    more = tl.sum(hit.to(tl.int32), axis=0) == CB
                    j -= CB
        first = row == r0
        acc += tl.where(first[:, None], carry[None, :], 0.0)
        local = row - tl.load(row_off_ptr + t, mask=m, other=0)
        base = tl.load(w_off_ptr + t, mask=m, other=0) + local * d
        wmask = ends[:, None] & cmask
        w = tl.load(weight_ptr + base[:, None] + cols[None, :], mask=wmask, other=0.0).to(tl.float32)
        cnt = tl.load(counts_ptr + row, mask=ends, other=0)
        if ONLINE:
            cnt += seen + tl.where(first, carry_seen, 0)
            tl.store(counts_ptr + row, cnt, mask=ends)
        g = acc + lam * w / tl.maximum(cnt.to(tl.float32), 1.0)[:, None]
        if ADAGRAD:
            m_idx = tl.load(m_off_ptr + t, mask=m, other=0) + local
            mom = tl.load(momentum_ptr + m_idx, mask=ends, other=0.0) + \
                tl.sum(tl.where(cmask, g * g, 0.0), axis=1) / d.to(tl.float32)
            tl.store(momentum_ptr + m_idx, mom, mask=ends)
            w = w - lr * g / (tl.sqrt(mom)[:, None] + eps)
        else:
            w = w - lr * g
        tl.store(weight_ptr + base[:, None] + cols[None, :], w.to(weight_ptr.dtype.element_ty), mask=wmask)


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, and on the CPU only in its interpreter (TRITON_INTERPRET=1 set before
    triton is imported)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def chunk_size(block_d: int) -> int:
    """Sorted occurrences per program of the Triton update: CHUNK, fewer for wide rows (at most
    4096 gradient values in a program's tile)."""
    return max(16, min(CHUNK, 4096 // block_d))


def update_warps(chunk: int, block_d: int) -> int:
    """Warps per program of the update kernel: 16 tile values per thread (compiled for sm_90,
    4096-value tiles on 4 warps spill registers; on 8 they do not)."""
    return max(4, chunk * block_d // 512)


def update_rows_triton(layout: TableLayout, lin: torch.Tensor, src: torch.Tensor, grad: torch.Tensor, lr: float,
                       lam: float, eps: float, samples: torch.Tensor | None = None, n_samples: int = 0) -> None:
    """The Triton path, without a host sync: one sort, then two kernels over chunks of the sorted
    occurrences (carries of rows that cross a chunk boundary; segmented sums and row updates).
    Online counts (`samples` [N] in [0, n_samples)): the sort key is row · n_samples + sample, so
    that each row's distinct samples are counted in the same pass, before its step."""
    n = lin.numel()
    if n == 0:
        return
    if not grad.is_contiguous():
        raise ValueError("MBA Triton update: the gradient must be contiguous")
    online = samples is not None
    div = n_samples if online else 1
    keys = lin * div + samples if online else lin
    # a key below 2^31 sorts as int32, about twice as fast
    keys, perm = torch.sort(keys.to(torch.int32) if layout.num_rows * div < 2**31 else keys, stable=True)
    block_d = max(16, triton.next_power_of_2(layout.max_dim))
    c = chunk_size(block_d)
    chunks = triton.cdiv(n, c)
    n_tables = layout.dims.numel()
    block_t = triton.next_power_of_2(max(n_tables - 1, 1))
    sums = torch.empty(chunks, block_d, dtype=torch.float32, device=lin.device)
    new = torch.empty(chunks, dtype=torch.int32, device=lin.device) if online else sums  # unused unless ONLINE
    _carry_kernel[(chunks,)](sums, new, keys, perm, src, grad, layout.row_off, layout.dims, n, div, T=n_tables,
                             BLOCK_T=block_t, C=c, BLOCK_D=block_d, ONLINE=online)
    mom = layout.momentum if layout.momentum is not None else layout.counts  # unused unless ADAGRAD
    _update_kernel[(chunks,)](layout.weight, mom, layout.counts, keys, perm, src, grad, sums, new, layout.row_off,
                              layout.w_off, layout.m_off, layout.dims, n, div, float(lr), float(lam), float(eps),
                              T=n_tables, BLOCK_T=block_t, C=c, CB=CARRY_BLOCK, BLOCK_D=block_d,
                              ADAGRAD=layout.momentum is not None, ONLINE=online, num_warps=update_warps(c, block_d))


def occurrences_triton(layout: TableLayout, bags: Bags, indices: torch.Tensor, offsets: torch.Tensor, stride: int,
                        samples: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """occurrences_torch in one kernel."""
    n, n_bags = indices.numel(), offsets.numel() - 1
    dev = indices.device
    linearize = layout.dims.numel() > 1
    steps = n_bags.bit_length() if bags.pooled or linearize or samples else 0  # binary search for the bag
    lin = torch.empty(n, dtype=torch.int64, device=dev)
    src = torch.empty(n, dtype=torch.int64, device=dev)
    sample = torch.empty(n, dtype=torch.int64, device=dev) if samples else src
    if n:
        block = 1024
        _occurrences_kernel[(triton.cdiv(n, block),)](indices, offsets, bags.feature_table, layout.row_off,
                                                      bags.feature_col, lin, src, sample, n, n_bags, bags.batch,
                                                      stride, steps, POOLED=bags.pooled, LINEARIZE=linearize,
                                                      SAMPLES=samples, BLOCK=block)
    return lin, src, sample if samples else None


def update_rows_cpp(layout: TableLayout, lin: torch.Tensor, src: torch.Tensor, grad: torch.Tensor, lr: float,
                    lam: float, eps: float, samples: torch.Tensor | None = None, n_samples: int = 0) -> None:
    """The C++ path: online counts first (`samples`: count_samples_), then group the occurrences
    by row (one sort) and one pass per touched row."""
    if lin.numel() == 0:
        return
    if samples is not None:
        count_samples_(layout.counts, lin, samples)
    seg = segments(lin, src, layout)
    cpu_extension().update_rows(layout.weight, layout.momentum, layout.counts, layout.row_off, layout.w_off,
                                layout.m_off, layout.dims, seg.rows, seg.tab, seg.offsets, seg.src,
                                grad.float().contiguous().reshape(-1), lr, lam, eps)


KERNELS = ("auto", "cpp", "triton")


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """'auto' is Triton on CUDA and C++ on the CPU."""
    if kernel not in KERNELS:
        raise ValueError(f"MBA kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "auto":
        return "triton" if device.type == "cuda" else "cpp"
    if kernel == "triton" and not triton_usable(device):
        raise ValueError("MBA kernel 'triton' needs a CUDA device or TRITON_INTERPRET=1 with triton installed")
    if kernel == "cpp" and device.type != "cpu":
        raise ValueError(f"MBA kernel 'cpp' runs on the CPU, the tables are on {device}")
    return kernel


# per resolved kernel: how the occurrences are built, and the row update
PATHS = {"cpp": (occurrences_torch, update_rows_cpp), "triton": (occurrences_triton, update_rows_triton)}


def compile_kernels(arch: int = 90) -> list[str]:
    """Compile the Triton kernels as the wrappers launch them (dims 16, 64, 128; one table and
    three; SGD and Adagrad; static and online counts; fp32 and bf16 weights) for CUDA sm_<arch>,
    without a GPU: Triton's compiler and ptxas check the types and lowering that the interpreter
    lets through. Run without TRITON_INTERPRET. One line per kernel compiled, with ptxas's
    register and spill report (`python -m embedding.mba --compile 90` prints them)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    done = []

    def build(kernel, args: dict[str, str], consts: dict, num_warps: int = 4) -> None:
        signature = {**args, **dict.fromkeys(consts, "constexpr")}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts), target=target,
                                  options={"num_warps": num_warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(compiled.asm["ptx"])
            ptx.flush()
            log = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", ptx.name, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        done.append(f"{kernel.__name__} {consts} num_warps={num_warps}: {regs.group(1) if regs else '?'} registers, "
                    f"{spills.group(1) if spills else '?'} bytes spilled")

    i64, i32, f32 = "*i64", "*i32", "*fp32"
    for pooled, linearize, samples in [(True, False, False), (True, True, True), (False, True, True), (False, False, False)]:
        build(_occurrences_kernel, dict(indices_ptr=i64, offsets_ptr=i64, ftm_ptr=i64, row_off_ptr=i64, col_ptr=i64,
                                        lin_ptr=i64, src_ptr=i64, sample_ptr=i64, n="i32", n_bags="i32", batch="i32",
                                        stride="i32", steps="i32"),
              dict(POOLED=pooled, LINEARIZE=linearize, SAMPLES=samples, BLOCK=1024))
    for dim in (16, 64, 128):
        block_d = max(16, triton.next_power_of_2(dim))
        c = chunk_size(block_d)
        for (n_tables, block_t), online, adagrad, weight in [((1, 1), False, False, "*fp32"),
                                                             ((3, 2), True, True, "*fp32"),
                                                             ((1, 1), True, False, "*bf16")]:
            # keys: int32 below 2^31 (int64 here for a large online key); static counts: DIV = 1,
            # which Triton specializes as a constant
            keys, new, div = (("*i64" if adagrad else i32), i32, {}) if online else (i32, f32, {"DIV": 1})
            div_arg = {} if div else {"DIV": "i32"}
            build(_carry_kernel, dict(sums_ptr=f32, new_ptr=new, keys_ptr=keys, perm_ptr=i64, src_ptr=i64,
                                      grad_ptr=f32, row_off_ptr=i64, dims_ptr=i64, n="i32", **div_arg),
                  dict(T=n_tables, BLOCK_T=block_t, C=c, BLOCK_D=block_d, ONLINE=online, **div))
            build(_update_kernel, dict(weight_ptr=weight, momentum_ptr=f32 if adagrad else i32, counts_ptr=i32,
                                       keys_ptr=keys, perm_ptr=i64, src_ptr=i64, grad_ptr=f32, sums_ptr=f32,
                                       new_ptr=new, row_off_ptr=i64, w_off_ptr=i64, m_off_ptr=i64, dims_ptr=i64,
                                       n="i32", **div_arg, lr="fp32", lam="fp32", eps="fp32"),
                  dict(T=n_tables, BLOCK_T=block_t, C=c, CB=CARRY_BLOCK, BLOCK_D=block_d, ADAGRAD=adagrad,
                       ONLINE=online, **div), num_warps=update_warps(c, block_d))
    return done


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m embedding.mba",
                                     description="Build the C++ MBA kernel ahead of the first run (make setup).")
    parser.add_argument("--compile", type=int, metavar="ARCH",
                        help="instead, compile the Triton kernels for CUDA sm_ARCH (e.g. 90) without a GPU and "
                             "print ptxas's register and spill report (run without TRITON_INTERPRET)")
    cli = parser.parse_args()
    if cli.compile:
        print("\n".join(compile_kernels(cli.compile)))
    else:
        cpu_extension()
        print("embedding.mba: C++ CPU kernel built")

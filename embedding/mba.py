"""Mini-batch-aware L2 regularization (DIN paper §4.3.1, Eq. 5–7): the fused row update.

For every row j touched by the batch, one pass over the unique touched rows, with
g'_j = ḡ_j + λ·w_j/n_j (the gradient of Eq. 7) and t the number of this step (1 at the first):

    SGD:                   w_j ← w_j − η·g'_j                                        (Eq. 7)
    row-wise Adagrad:      s_j ← s_j + mean(g'_j²);  w_j ← w_j − η·g'_j/(√s_j + ε)
    Adam:                  m_j ← β1·m_j + (1−β1)·g'_j;  v_j ← β2·v_j + (1−β2)·g'_j²  (per element)
                           w_j ← w_j − η·(m_j/(1−β1^t)) / (√(v_j/(1−β2^t)) + ε)
    partial row-wise Adam: the same, with one v_j per row: v_j ← β2·v_j + (1−β2)·mean(g'_j²)

ḡ_j is the sum of the gradients of all occurrences of row j in the batch (the loss is already the
global-batch mean, so this sum is the mean gradient of Eq. 7), taken at the weights *before* the
step. Rows not touched are not written, their Adam moments included (lazy Adam, as FBGEMM's ADAM
and PARTIAL_ROWWISE_ADAM: the bias corrections use the global step t). λ = 0 is the plain
optimizer: FBGEMM's EXACT_SGD, EXACT_ROWWISE_ADAGRAD, ADAM, PARTIAL_ROWWISE_ADAM (FBGEMM has no
CPU kernel for the last two; ours is the CPU path of plain Adam too).

Layout (as in FBGEMM's table-batched modules): the tables of a group share one flat weight
storage, one flat row-wise Adagrad state and one flat count array; their rows are numbered in one
linear space (`TableLayout`). A batch is a list of occurrences: the linear row, and the element
offset `src` of its gradient (its D_t values) in the flat upstream gradient (pooled: the sample's
row of the feature's columns; sequence: the lookup's own row). The gradient is never
materialized per lookup.

This module is the contract both kernels implement: the layout (`TableLayout`), the batch's
lookups as occurrences (`Bags`, `occurrences_torch`), their grouping by row (`segments`) and the
online counts (`count_samples_`). The kernels:

- embedding.mba_cpp (CPU): C++, the touched rows split over the threads, each row summed and
  updated in one pass (embedding/csrc/mba_cpu.cpp); the grouping by a counting sort where the
  group has few rows for the batch's occurrences (segments_cpu), else `segments`;
- embedding.mba_triton (GPU; on the CPU under TRITON_INTERPRET=1, which is how CI checks it):
  no host sync, the occurrences in one kernel, one sort and two kernels over chunks of sorted
  occurrences;
- embedding.mba_compile compiles the Triton kernels for a GPU architecture without a GPU;
- embedding.mba_tbe picks a kernel for a device and runs it inside torchrec's sharded kernels.

Weights may be stored in fp32, fp16 or bf16; the math and every optimizer state are fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedding.layout import jagged_rows

RULES = ("sgd", "rowwise_adagrad", "adam", "partial_rowwise_adam")  # the kernels' MODE is the index


@dataclass(frozen=True)
class Rule:
    """The optimizer of one step: its kind (of RULES), hyper-parameters, and t, the number of this
    step (1 at the first), for Adam's bias corrections."""

    kind: str
    lr: float
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    step: int = 1

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ValueError(f"MBA optimizer must be one of {', '.join(RULES)}, got {self.kind!r}")

    @property
    def mode(self) -> int:
        return RULES.index(self.kind)

    @property
    def bias1(self) -> float:
        return 1.0 - self.beta1**self.step

    @property
    def bias2(self) -> float:
        return 1.0 - self.beta2**self.step

    def check(self, layout: TableLayout) -> None:
        """The layout holds the states this rule updates (and no other)."""
        has = (layout.momentum is not None, layout.exp_avg is not None, layout.exp_avg_sq is not None)
        need = {
            "sgd": (False, False, False),
            "rowwise_adagrad": (True, False, False),
            "adam": (False, True, True),
            "partial_rowwise_adam": (True, True, False),
        }[self.kind]
        if has != need:
            names = ("momentum", "exp_avg", "exp_avg_sq")
            raise ValueError(
                f"MBA {self.kind}: the layout has states {[n for n, h in zip(names, has, strict=True) if h]}, "
                f"the rule updates {[n for n, h in zip(names, need, strict=True) if h]}"
            )


@dataclass
class TableLayout:
    """A group of tables in flat storages. Per table t (int64 tensors on the tables' device):
    linear rows row_off[t] .. row_off[t+1]-1, dim dims[t], row 0 at element w_off[t] of `weight`
    and at m_off[t] of `momentum` (a row-wise state: Adagrad's sum, partial row-wise Adam's v; or
    None). The element-wise states `exp_avg` (Adam's m) and `exp_avg_sq` (Adam's v), fp32 or None,
    are laid out as `weight` (row j of table t at element w_off[t] + j·dims[t]). `counts` (int32,
    n_j) is indexed by linear row."""

    weight: torch.Tensor
    momentum: torch.Tensor | None
    counts: torch.Tensor
    row_off: torch.Tensor
    w_off: torch.Tensor
    m_off: torch.Tensor
    dims: torch.Tensor
    max_dim: int
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.counts.numel()

    def table_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The table of each linear row."""
        return torch.searchsorted(self.row_off, rows, right=True) - 1

    @staticmethod
    def of(
        weights: list[torch.Tensor],
        momenta: list[torch.Tensor] | None,
        counts: torch.Tensor,
        exp_avg: torch.Tensor | None = None,
        exp_avg_sq: torch.Tensor | None = None,
    ) -> TableLayout:
        """From per-table views [rows_t, D_t] (and [rows_t]) that share one storage each, as
        FBGEMM's split_embedding_weights() / get_optimizer_state() return them; the element-wise
        states flat, of the size of the weights' storage."""
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

        for name, x in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if x is not None and (x.dtype != torch.float32 or x.numel() != flat.numel() or not x.is_contiguous()):
                raise ValueError(f"MBA: {name} must be contiguous fp32 of the weights' {flat.numel()} elements")

        def dev_tensor(x):
            return torch.tensor(x, dtype=torch.int64, device=dev)

        return TableLayout(
            weight=flat,
            momentum=mom,
            counts=counts,
            row_off=row_off.to(dev),
            w_off=dev_tensor([w.storage_offset() for w in weights]),
            m_off=dev_tensor(m_off),
            dims=dev_tensor([w.shape[1] for w in weights]),
            max_dim=max(w.shape[1] for w in weights),
            exp_avg=exp_avg,
            exp_avg_sq=exp_avg_sq,
        )


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
    # A group has < 2^31 rows in practice: int32 keys take half the radix-sort passes of int64.
    return torch.sort(lin.to(torch.int32) if layout.num_rows < 2**31 else lin, stable=True)


def segments(lin: torch.Tensor, src: torch.Tensor, layout: TableLayout) -> Segments:
    """Group the occurrences (linear rows lin [N], gradient offsets src [N]) by row: one sort."""
    lin_sorted, perm = sort_rows(lin, layout)
    rows, counts = torch.unique_consecutive(lin_sorted, return_counts=True)
    rows = rows.to(torch.int64)
    offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=lin.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return Segments(rows, layout.table_of(rows), offsets, src.index_select(0, perm))


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


def occurrences_torch(
    layout: TableLayout, bags: Bags, indices: torch.Tensor, offsets: torch.Tensor, stride: int, samples: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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

"""The MBA row update on the CPU: the C++ kernel (embedding/csrc/mba_cpu.cpp); the contract is
embedding.mba. Small groups sum the occurrences into dense per-row buffers; others group them by
row and split the touched rows over the threads, each row summed and updated in one pass.

`python -m embedding.mba_cpp` builds the kernel ahead of the first run (`make setup` does).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from embedding import cpp
from embedding.mba import Bags, Rule, Segments, TableLayout, count_samples_, segments


@functools.cache
def cpu_extension():
    """The C++ CPU kernel, compiled on first use and cached by torch."""
    return cpp.load(Path(__file__).with_name("csrc") / "mba_cpu.cpp", "dinrec_mba_cpu", ("-fopenmp",))


def occurrences_cpp(
    layout: TableLayout, bags: Bags, indices: torch.Tensor, offsets: torch.Tensor, stride: int, samples: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """embedding.mba.occurrences_torch in one C++ pass over the bags (the torch ops took about ten
    passes over the lookups)."""
    lin, src, sample = cpu_extension().occurrences(
        indices.long().contiguous(),
        offsets.long().contiguous(),
        bags.batch,
        bags.feature_table.long().contiguous(),
        bags.feature_col.long().contiguous(),
        layout.row_off.long().contiguous(),
        stride,
        bags.pooled,
        samples,
    )
    return lin, src, sample if samples else None


ROWS_PER_OCCURRENCE = 4  # segments_cpu counts (one pass over the rows) up to this many rows per occurrence


def segments_cpu(lin: torch.Tensor, src: torch.Tensor, layout: TableLayout) -> Segments:
    """embedding.mba.segments on the CPU: a counting sort in C++ (O(N + rows)) where the group has
    at most ROWS_PER_OCCURRENCE rows per occurrence (a sort of N keys costs more there), else the sort."""
    if layout.num_rows > ROWS_PER_OCCURRENCE * lin.numel():
        return segments(lin, src, layout)
    rows, offsets, grouped = cpu_extension().group_rows(
        lin.to(torch.int64).contiguous(), src.to(torch.int64).contiguous(), layout.num_rows
    )
    return Segments(rows, layout.table_of(rows), offsets, grouped)


# accumulate_update (dense per-row sums, no grouping) where the group has at most this many rows
# per occurrence; it sums in at most occurrences / rows parts (one per thread), so that its
# buffers (rows × dim per part) stay no larger than the gradient it reads
DENSE_ROWS_PER_OCCURRENCE = 1


def update_rows_cpp(
    layout: TableLayout,
    lin: torch.Tensor,
    src: torch.Tensor,
    grad: torch.Tensor,
    rule: Rule,
    lam: float,
    samples: torch.Tensor | None = None,
    n_samples: int = 0,
) -> None:
    """The C++ path: online counts first (`samples`: count_samples_), then the step. A group with
    few rows for the batch (DENSE_ROWS_PER_OCCURRENCE) sums the occurrences in their order into
    dense per-row buffers, one per thread up to occurrences / rows of them (accumulate_update);
    else the occurrences are grouped by row (segments_cpu) and each touched row summed and
    updated in one pass (update_rows)."""
    rule.check(layout)
    if lin.numel() == 0:
        return
    if samples is not None:
        count_samples_(layout.counts, lin, samples)
    ext = cpu_extension()
    states = (layout.weight, layout.momentum, layout.exp_avg, layout.exp_avg_sq, layout.counts)
    tables = (layout.row_off, layout.w_off, layout.m_off, layout.dims)
    hyper = (rule.mode, rule.lr, lam, rule.eps, rule.beta1, rule.beta2, rule.bias1, rule.bias2)
    grad = grad.float().contiguous().reshape(-1)
    if layout.num_rows <= DENSE_ROWS_PER_OCCURRENCE * lin.numel():
        parts = max(1, min(torch.get_num_threads(), lin.numel() // max(layout.num_rows, 1)))
        lin, src = lin.to(torch.int64).contiguous(), src.to(torch.int64).contiguous()
        ext.accumulate_update(*states, *tables, lin, src, grad, parts, *hyper)
        return
    seg = segments_cpu(lin, src, layout)
    ext.update_rows(*states, *tables, seg.rows, seg.tab, seg.offsets, seg.src, grad, *hyper)


if __name__ == "__main__":
    cpu_extension()
    print("embedding.mba_cpp: C++ CPU kernel built")

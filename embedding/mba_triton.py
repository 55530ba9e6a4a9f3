"""The MBA row update on the GPU, in Triton (on the CPU under TRITON_INTERPRET=1, which is how CI
checks it); the contract is embedding.mba.

No host sync, a few launches: the occurrences in one kernel (each lookup finds its bag by binary
search in the offsets), one sort, then two kernels over chunks of C sorted occurrences. A row
whose occurrences run on past the end of a chunk leaves there the sum of its occurrences in that
chunk (`_carry_kernel`); then each chunk sums, by a segmented scan, the rows that end in it, adds
to its first row the sums left by the chunks before, and updates those rows (`_update_kernel`).
A Zipf-head row with thousands of occurrences is summed by many programs, deterministically,
without atomics. Online counts ride in the same pass: the sort key is row · B + sample, so a
row's distinct samples are adjacent and the same scan counts them.
"""

from __future__ import annotations

import os

import torch

from embedding.mba import Bags, Rule, TableLayout

try:  # Triton is optional on the CPU (tests run it under TRITON_INTERPRET=1).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

CHUNK = 128  # sorted occurrences per program of the update (fewer for wide rows: chunk_size)
CARRY_BLOCK = 32  # earlier chunks whose carried sums one step of the update's carry loop reads

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
    def _occurrences_kernel(
        indices_ptr,
        offsets_ptr,
        ftm_ptr,
        row_off_ptr,
        col_ptr,
        lin_ptr,
        src_ptr,
        sample_ptr,
        n,
        n_bags,
        batch,
        stride,
        steps,
        POOLED: tl.constexpr,
        LINEARIZE: tl.constexpr,
        SAMPLES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
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
    def _carry_kernel(
        sums_ptr,
        new_ptr,
        keys_ptr,
        perm_ptr,
        src_ptr,
        grad_ptr,
        row_off_ptr,
        dims_ptr,
        n,
        DIV,
        T: tl.constexpr,
        BLOCK_T: tl.constexpr,
        C: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ONLINE: tl.constexpr,
    ):
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
                g = tl.load(
                    grad_ptr + s[:, None] + cols[None, :], mask=sel[:, None] & (cols[None, :] < d[:, None]), other=0.0
                )
                tl.store(sums_ptr + p * BLOCK_D + cols, tl.sum(g.to(tl.float32), axis=0))
                if ONLINE:  # a sample is new where the key changes (keys sorted by row, then sample)
                    k_prev = tl.load(keys_ptr + i - 1, mask=i > 0, other=-1)
                    tl.store(new_ptr + p, tl.sum((sel & (k != k_prev)).to(tl.int32), axis=0))

    @triton.jit
    def _update_kernel(
        weight_ptr,
        momentum_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        counts_ptr,
        keys_ptr,
        perm_ptr,
        src_ptr,
        grad_ptr,
        sums_ptr,
        new_ptr,
        row_off_ptr,
        w_off_ptr,
        m_off_ptr,
        dims_ptr,
        n,
        DIV,
        lr,
        lam,
        eps,
        beta1,
        beta2,
        bias1,
        bias2,
        T: tl.constexpr,
        BLOCK_T: tl.constexpr,
        C: tl.constexpr,
        CB: tl.constexpr,
        BLOCK_D: tl.constexpr,
        MODE: tl.constexpr,
        ONLINE: tl.constexpr,
    ):
        """Chunk q: every row that ends in it sums its gradients (a segmented scan over the chunk,
        plus, for the chunk's first row, the sums that _carry_kernel left in earlier chunks) and
        takes its MBA step (MODE: the index in embedding.mba.RULES); with online counts, its n_j
        first grows by the row's samples in the batch, counted the same way."""
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
                    carry += tl.sum(
                        tl.load(sums_ptr + js[:, None] * BLOCK_D + cols[None, :], mask=hit[:, None], other=0.0), axis=0
                    )
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
        at = base[:, None] + cols[None, :]
        if MODE == 0:  # SGD
            w = w - lr * g
        else:
            if MODE != 2:  # a row-wise state: Adagrad's sum, partial row-wise Adam's v
                m_idx = tl.load(m_off_ptr + t, mask=m, other=0) + local
                sq = tl.sum(tl.where(cmask, g * g, 0.0), axis=1) / d.to(tl.float32)
                mom = tl.load(momentum_ptr + m_idx, mask=ends, other=0.0)
                if MODE == 1:
                    mom = mom + sq
                else:
                    mom = beta2 * mom + (1.0 - beta2) * sq
                tl.store(momentum_ptr + m_idx, mom, mask=ends)
            if MODE == 1:  # row-wise Adagrad
                w = w - lr * g / (tl.sqrt(mom)[:, None] + eps)
            else:  # Adam (2), partial row-wise Adam (3): m per element
                m1 = beta1 * tl.load(exp_avg_ptr + at, mask=wmask, other=0.0) + (1.0 - beta1) * g
                tl.store(exp_avg_ptr + at, m1, mask=wmask)
                if MODE == 2:
                    v = beta2 * tl.load(exp_avg_sq_ptr + at, mask=wmask, other=0.0) + (1.0 - beta2) * g * g
                    tl.store(exp_avg_sq_ptr + at, v, mask=wmask)
                else:
                    v = tl.broadcast_to(mom[:, None], (C, BLOCK_D))
                w = w - lr * (m1 / bias1) / (tl.sqrt(v / bias2) + eps)
        tl.store(weight_ptr + at, w.to(weight_ptr.dtype.element_ty), mask=wmask)


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


def update_rows_triton(
    layout: TableLayout,
    lin: torch.Tensor,
    src: torch.Tensor,
    grad: torch.Tensor,
    rule: Rule,
    lam: float,
    samples: torch.Tensor | None = None,
    n_samples: int = 0,
) -> None:
    """The Triton path, without a host sync: one sort, then two kernels over chunks of the sorted
    occurrences (carries of rows that cross a chunk boundary; segmented sums and row updates).
    Online counts (`samples` [N] in [0, n_samples)): the sort key is row · n_samples + sample, so
    that each row's distinct samples are counted in the same pass, before its step."""
    rule.check(layout)
    n = lin.numel()
    if n == 0:
        return
    if not grad.is_contiguous():
        raise ValueError("MBA Triton update: the gradient must be contiguous")
    online = samples is not None
    div = n_samples if online else 1
    keys = lin * div + samples if online else lin
    # a key below 2^31 sorts as int32: half the radix-sort passes of int64
    keys, perm = torch.sort(keys.to(torch.int32) if layout.num_rows * div < 2**31 else keys, stable=True)
    block_d = max(16, triton.next_power_of_2(layout.max_dim))
    c = chunk_size(block_d)
    chunks = triton.cdiv(n, c)
    n_tables = layout.dims.numel()
    block_t = triton.next_power_of_2(max(n_tables - 1, 1))
    sums = torch.empty(chunks, block_d, dtype=torch.float32, device=lin.device)
    new = torch.empty(chunks, dtype=torch.int32, device=lin.device) if online else sums  # unused unless ONLINE
    _carry_kernel[(chunks,)](
        sums,
        new,
        keys,
        perm,
        src,
        grad,
        layout.row_off,
        layout.dims,
        n,
        div,
        T=n_tables,
        BLOCK_T=block_t,
        C=c,
        BLOCK_D=block_d,
        ONLINE=online,
    )

    def state(x):  # a state the rule does not use is not read: any pointer will do
        return x if x is not None else layout.counts

    _update_kernel[(chunks,)](
        layout.weight,
        state(layout.momentum),
        state(layout.exp_avg),
        state(layout.exp_avg_sq),
        layout.counts,
        keys,
        perm,
        src,
        grad,
        sums,
        new,
        layout.row_off,
        layout.w_off,
        layout.m_off,
        layout.dims,
        n,
        div,
        float(rule.lr),
        float(lam),
        float(rule.eps),
        float(rule.beta1),
        float(rule.beta2),
        float(rule.bias1),
        float(rule.bias2),
        T=n_tables,
        BLOCK_T=block_t,
        C=c,
        CB=CARRY_BLOCK,
        BLOCK_D=block_d,
        MODE=rule.mode,
        ONLINE=online,
        num_warps=update_warps(c, block_d),
    )


def occurrences_triton(
    layout: TableLayout, bags: Bags, indices: torch.Tensor, offsets: torch.Tensor, stride: int, samples: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
        _occurrences_kernel[(triton.cdiv(n, block),)](
            indices,
            offsets,
            bags.feature_table,
            layout.row_off,
            bags.feature_col,
            lin,
            src,
            sample,
            n,
            n_bags,
            bags.batch,
            stride,
            steps,
            POOLED=bags.pooled,
            LINEARIZE=linearize,
            SAMPLES=samples,
            BLOCK=block,
        )
    return lin, src, sample if samples else None

"""The MBA row update (C++ and Triton kernels) against a numpy loop over rows implementing DIN
Eq. 7 under each optimizer (SGD, row-wise Adagrad, Adam, partial row-wise Adam), and the online
sample counts against a per-sample count.

The kernels see a group of two tables of different dims in one flat storage (as FBGEMM lays them
out, here with a gap before each table), their row-wise state in another, the element-wise
(Adam) states laid out as the weights, and gradients as element offsets into a flat upstream
gradient."""

import numpy as np
import pytest
import torch

from embedding import mba, mba_cpp, mba_triton
from tests.conftest import CUDA

DIMS = [12, 4]  # 12: not a power of two, the Triton kernels mask their columns
ROWS = [30, 20]


RULES = mba.RULES
B1, B2, EPS = 0.8, 0.95, 1e-8  # Adam's decays, far from the defaults so that a swap shows


def numpy_step(w, s, n, rows, grads, lr, lam, rule, m=None, v=None, t=1, eps=EPS):
    """One step of `rule` (a name of mba.RULES, or a bool: row-wise Adagrad or SGD) written
    directly from the formulas. w, s (row-wise state), m, v (element-wise): per table; rows:
    (table, row) per occurrence; grads: per occurrence. Returns the new (w, s) or, for the Adam
    kinds, (w, s, m, v)."""
    rule = rule if isinstance(rule, str) else ("rowwise_adagrad" if rule else "sgd")
    w = [x.astype(np.float64).copy() for x in w]
    s = [x.astype(np.float64).copy() for x in s]
    m = [np.zeros_like(x) for x in w] if m is None else [x.astype(np.float64).copy() for x in m]
    v = [np.zeros_like(x) for x in w] if v is None else [x.astype(np.float64).copy() for x in v]
    for tab, j in sorted(set(rows)):
        g = sum(grads[k].astype(np.float64) for k, r in enumerate(rows) if r == (tab, j))
        g = g + lam * w[tab][j] / max(n[tab][j], 1)
        if rule == "sgd":
            w[tab][j] = w[tab][j] - lr * g
        elif rule == "rowwise_adagrad":
            s[tab][j] += (g * g).mean()
            w[tab][j] = w[tab][j] - lr * g / (np.sqrt(s[tab][j]) + eps)
        else:
            m[tab][j] = B1 * m[tab][j] + (1 - B1) * g
            if rule == "adam":
                v[tab][j] = B2 * v[tab][j] + (1 - B2) * g * g
                v_hat = v[tab][j] / (1 - B2**t)
            else:
                s[tab][j] = B2 * s[tab][j] + (1 - B2) * (g * g).mean()
                v_hat = s[tab][j] / (1 - B2**t)
            w[tab][j] = w[tab][j] - lr * (m[tab][j] / (1 - B1**t)) / (np.sqrt(v_hat) + eps)
    return (w, s) if rule in ("sgd", "rowwise_adagrad") else (w, s, m, v)


def make_group(w0, dtype, device):
    """The tables as views into one flat storage (5 elements of gap before each)."""
    size = sum(r * d + 5 for r, d in zip(ROWS, DIMS, strict=True))
    flat = torch.full((size,), 7.0, dtype=dtype, device=device)
    mflat = torch.zeros(sum(ROWS) + 6, device=device)
    views, mviews, at, mat = [], [], 5, 3
    for t, (r, d) in enumerate(zip(ROWS, DIMS, strict=True)):
        views.append(flat[at : at + r * d].view(r, d))
        views[-1].copy_(torch.tensor(w0[t], dtype=dtype))
        mviews.append(mflat[mat : mat + r])
        at, mat = at + r * d + 5, mat + r
    return flat, views, mviews


def run_update(
    kernel, views, mviews, counts, rows, grads, lr, lam, rule, samples=None, n_samples=0, elementwise=None, t=1
):
    """The contract: occurrences as linear rows, their gradients scattered at element offsets of a
    flat buffer (here in a shuffled order, each D_t long, with gaps); online counts: the sample of
    each occurrence. `rule`: a name of mba.RULES (or a bool: row-wise Adagrad or SGD);
    `elementwise`: Adam's flat (m, v), laid out as the weights' storage."""
    dev = views[0].device
    rule = rule if isinstance(rule, str) else ("rowwise_adagrad" if rule else "sgd")
    m, v = elementwise or (None, None)
    rowwise = rule in ("rowwise_adagrad", "partial_rowwise_adam")
    layout = mba.TableLayout.of(views, mviews if rowwise else None, counts, m, v if rule == "adam" else None)
    lin = torch.tensor([sum(ROWS[:t]) + j for t, j in rows], device=dev)
    perm = np.random.default_rng(1).permutation(len(rows))
    width = max(DIMS) + 3
    flat_grad = torch.zeros(len(rows) * width, device=dev)
    src = torch.zeros(len(rows), dtype=torch.int64)
    for slot, k in enumerate(perm):
        d = DIMS[rows[k][0]]
        flat_grad[slot * width : slot * width + d] = torch.tensor(grads[k][:d])
        src[k] = slot * width
    if samples is not None:
        samples = torch.tensor(samples, device=dev)
    step = mba.Rule(rule, lr, eps=EPS, beta1=B1, beta2=B2, step=t)
    kernel(layout, lin, src.to(dev), flat_grad, step, lam, samples, n_samples)


# Triton is a test dependency: its kernels run here in the interpreter (tests/conftest.py); on a
# GPU machine (TRITON_INTERPRET=0) the cuda cases run them compiled.
def cpp_path(rows_per_occurrence: float):
    """mba_cpp.update_rows_cpp with its choice of path fixed: dense per-row sums (inf; 3 threads,
    so 3 partial sums per row whatever the machine) or rows grouped first (0)."""

    def run(*args):
        saved, threads = mba_cpp.DENSE_ROWS_PER_OCCURRENCE, torch.get_num_threads()
        mba_cpp.DENSE_ROWS_PER_OCCURRENCE = rows_per_occurrence
        torch.set_num_threads(3)
        try:
            mba_cpp.update_rows_cpp(*args)
        finally:
            mba_cpp.DENSE_ROWS_PER_OCCURRENCE = saved
            torch.set_num_threads(threads)

    return run


KERNELS = {
    "cpp": mba_cpp.update_rows_cpp,  # its own choice (both paths over the steps of the first test)
    "cpp-dense": cpp_path(float("inf")),
    "cpp-grouped": cpp_path(0),
    "triton": mba_triton.update_rows_triton,
}
CASES = [
    ("cpu", "cpp"),
    ("cpu", "cpp-dense"),
    ("cpu", "cpp-grouped"),
    ("cpu", "triton"),
    pytest.param("cuda", "triton", marks=CUDA),
]


@pytest.mark.parametrize("device,kernel", CASES)
@pytest.mark.parametrize("adagrad", [False, True])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_update_matches_eq7_over_several_steps(device, kernel, adagrad, lam):
    rng = np.random.default_rng(0)
    w0 = [rng.standard_normal((r, d)).astype(np.float32) for r, d in zip(ROWS, DIMS, strict=True)]
    n = [rng.integers(1, 20, r).astype(np.int32) for r in ROWS]
    n[0][3] = 0  # a row never counted (e.g. stale counts) is divided by 1, not 0
    flat, views, mviews = make_group(w0, torch.float32, device)
    counts = torch.tensor(np.concatenate(n), device=device)
    ref_w, ref_s = w0, [np.zeros(r) for r in ROWS]
    touched = set()
    for step in range(3):
        size = 300 if step == 0 else 40  # the first batch has rows with more than CHUNK occurrences
        rows = [(int(t), int(rng.integers(0, ROWS[t] - 5))) for t in rng.integers(0, 2, size)]
        rows[:5] = [rows[0]] * 5
        rows[5] = (0, 3)
        if step == 0:
            rows += [(1, 2)] * (mba_triton.CHUNK * 2 + 7)
        grads = rng.standard_normal((len(rows), max(DIMS))).astype(np.float32)
        touched |= set(rows)
        run_update(KERNELS[kernel], views, mviews, counts, rows, grads, 0.1, lam, adagrad)
        ref_w, ref_s = numpy_step(
            ref_w, ref_s, n, rows, [g[: DIMS[r[0]]] for g, r in zip(grads, rows, strict=True)], 0.1, lam, adagrad
        )
        for t in range(2):
            np.testing.assert_allclose(views[t].cpu().numpy(), ref_w[t], rtol=1e-5, atol=1e-5)
            if adagrad:
                np.testing.assert_allclose(mviews[t].cpu().numpy(), ref_s[t], rtol=1e-5, atol=1e-6)
    for t in range(2):  # untouched rows bit-identical
        untouched = sorted(set(range(ROWS[t])) - {j for tt, j in touched if tt == t})
        assert untouched and np.array_equal(views[t].cpu().numpy()[untouched], w0[t][untouched])
    # the gaps between tables were never written
    assert (flat[:5] == 7).all() and (flat[5 + ROWS[0] * DIMS[0] : 10 + ROWS[0] * DIMS[0]] == 7).all()


@pytest.mark.parametrize("device,kernel", CASES)
@pytest.mark.parametrize("rule", ["adam", "partial_rowwise_adam"])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_adam_matches_the_formulas_over_several_steps(device, kernel, rule, lam):
    """Lazy Adam and partial row-wise Adam with MBA's term: m, v (per element, or per row) and the
    weights after each of 3 steps against numpy, with the bias corrections of steps 1..3; rows not
    touched keep their weights and moments; the gaps of the storage are never written."""
    rng = np.random.default_rng(11)
    w0 = [rng.standard_normal((r, d)).astype(np.float32) for r, d in zip(ROWS, DIMS, strict=True)]
    n = [rng.integers(1, 20, r).astype(np.int32) for r in ROWS]
    flat, views, mviews = make_group(w0, torch.float32, device)
    m_flat, v_flat = torch.zeros(flat.numel(), device=device), torch.zeros(flat.numel(), device=device)
    counts = torch.tensor(np.concatenate(n), device=device)

    def per_table(x):  # the element-wise state's tables, at the weights' offsets
        return [x[v.storage_offset() : v.storage_offset() + v.numel()].view_as(v) for v in views]

    ref_w, ref_s, ref_m, ref_v = w0, [np.zeros(r) for r in ROWS], None, None
    for t in (1, 2, 3):
        size = 200 if t == 1 else 40
        rows = [(int(tab), int(rng.integers(0, ROWS[tab] - 5))) for tab in rng.integers(0, 2, size)]
        if t == 1:
            rows += [(1, 2)] * (mba_triton.CHUNK + 9)  # a row across chunks of the Triton update
        grads = rng.standard_normal((len(rows), max(DIMS))).astype(np.float32)
        run_update(
            KERNELS[kernel], views, mviews, counts, rows, grads, 0.05, lam, rule, elementwise=(m_flat, v_flat), t=t
        )
        ref_w, ref_s, ref_m, ref_v = numpy_step(
            ref_w,
            ref_s,
            n,
            rows,
            [g[: DIMS[r[0]]] for g, r in zip(grads, rows, strict=True)],
            0.05,
            lam,
            rule,
            ref_m,
            ref_v,
            t,
        )
        for tab in range(2):
            np.testing.assert_allclose(views[tab].cpu().numpy(), ref_w[tab], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(per_table(m_flat)[tab].cpu().numpy(), ref_m[tab], rtol=1e-5, atol=1e-6)
            if rule == "adam":
                np.testing.assert_allclose(per_table(v_flat)[tab].cpu().numpy(), ref_v[tab], rtol=1e-5, atol=1e-7)
            else:
                np.testing.assert_allclose(mviews[tab].cpu().numpy(), ref_s[tab], rtol=1e-5, atol=1e-7)
    for tab in range(2):  # rows never touched: weights as they were, moments zero
        untouched = ~np.any(ref_m[tab] != 0, axis=1)
        assert untouched.any()
        assert np.array_equal(views[tab].cpu().numpy()[untouched], w0[tab][untouched])
    assert (flat[:5] == 7).all() and (m_flat[:5] == 0).all()
    if rule == "partial_rowwise_adam":
        assert (v_flat == 0).all()  # the element-wise v is not this rule's state


def test_a_rule_refuses_a_layout_without_its_states():
    _, views, mviews = make_group(
        [np.zeros((r, d), np.float32) for r, d in zip(ROWS, DIMS, strict=True)], torch.float32, "cpu"
    )
    layout = mba.TableLayout.of(views, mviews, torch.zeros(sum(ROWS), dtype=torch.int32))
    with pytest.raises(ValueError, match="adam"):
        mba_cpp.update_rows_cpp(
            layout,
            torch.zeros(1, dtype=torch.int64),
            torch.zeros(1, dtype=torch.int64),
            torch.zeros(12),
            mba.Rule("adam", 0.1),
            0.0,
        )


@pytest.mark.parametrize("device,kernel", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_storage_fp32_math(device, kernel, dtype):
    """fp16/bf16 rows: the update is computed in fp32 from the stored value and rounded once."""
    rng = np.random.default_rng(2)
    w0 = [rng.standard_normal((r, d)).astype(np.float32) for r, d in zip(ROWS, DIMS, strict=True)]
    _, views, mviews = make_group(w0, dtype, device)
    stored = [v.float().cpu().numpy() for v in views]
    n = [rng.integers(1, 5, r).astype(np.int32) for r in ROWS]
    rows = [(int(t), int(rng.integers(0, ROWS[t]))) for t in rng.integers(0, 2, 30)]
    grads = rng.standard_normal((30, max(DIMS))).astype(np.float32)
    run_update(
        KERNELS[kernel], views, mviews, torch.tensor(np.concatenate(n), device=device), rows, grads, 0.1, 0.3, False
    )
    ref, _ = numpy_step(
        stored,
        [np.zeros(r) for r in ROWS],
        n,
        rows,
        [g[: DIMS[r[0]]] for g, r in zip(grads, rows, strict=True)],
        0.1,
        0.3,
        False,
    )
    for t in range(2):
        assert views[t].dtype == dtype
        np.testing.assert_allclose(
            views[t].float().cpu().numpy(), torch.tensor(ref[t]).to(dtype).float().numpy(), rtol=1e-2, atol=1e-2
        )


TRITON_DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def assert_one_step(views, mviews, w0, n, rows, grads, adagrad, lr=0.1, lam=0.5):
    """The tables (and Adagrad sums) after one step from w0 equal the numpy step with counts n."""
    ref, ref_s = numpy_step(
        w0,
        [np.zeros(r) for r in ROWS],
        n,
        rows,
        [g[: DIMS[r[0]]] for g, r in zip(grads, rows, strict=True)],
        lr,
        lam,
        adagrad,
    )
    for t in range(2):
        np.testing.assert_allclose(views[t].cpu().numpy(), ref[t], rtol=1e-4, atol=1e-5)
        if adagrad:
            np.testing.assert_allclose(mviews[t].cpu().numpy(), ref_s[t], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_rows_spanning_many_chunks(device, monkeypatch):
    """Rows whose occurrences fill several chunks of the Triton update, back to back (a row ends and
    the next begins inside a chunk and goes on), with the carry loop reading 2 chunks per step."""
    monkeypatch.setattr(mba_triton, "CARRY_BLOCK", 2)
    rng = np.random.default_rng(4)
    w0 = [rng.standard_normal((r, d)).astype(np.float32) for r, d in zip(ROWS, DIMS, strict=True)]
    n = [rng.integers(1, 20, r).astype(np.int32) for r in ROWS]
    _, views, mviews = make_group(w0, torch.float32, device)
    rows = (
        [(0, 7)] * (mba_triton.CHUNK * 5 + 3)
        + [(0, 8)] * (mba_triton.CHUNK * 2 + 50)
        + [(1, 0)] * 3
        + [(1, 1)] * mba_triton.CHUNK
    )
    rows += [(int(t), int(rng.integers(0, ROWS[t]))) for t in rng.integers(0, 2, 100)]
    grads = rng.standard_normal((len(rows), max(DIMS))).astype(np.float32)
    for adagrad in (False, True):
        run_update(
            mba_triton.update_rows_triton,
            views,
            mviews,
            torch.tensor(np.concatenate(n), device=device),
            rows,
            grads,
            0.1,
            0.5,
            adagrad,
        )
        assert_one_step(views, mviews, w0, n, rows, grads, adagrad)
        for t in range(2):
            views[t].copy_(torch.tensor(w0[t]))


@pytest.mark.parametrize("device,kernel", CASES)
@pytest.mark.parametrize("adagrad", [False, True])
def test_online_counts_counted_before_the_step(device, kernel, adagrad, monkeypatch):
    """Online n_j: each touched row's count grows by the number of distinct samples of the batch
    that look it up (repeats within a sample count once), and the step uses the grown count. Rows
    span several chunks of the Triton update, with a sample's repeats across a chunk boundary."""
    monkeypatch.setattr(mba_triton, "CARRY_BLOCK", 2)
    rng = np.random.default_rng(7)
    w0 = [rng.standard_normal((r, d)).astype(np.float32) for r, d in zip(ROWS, DIMS, strict=True)]
    n0 = [rng.integers(0, 5, r).astype(np.int32) for r in ROWS]
    _, views, mviews = make_group(w0, torch.float32, device)
    counts = torch.tensor(np.concatenate(n0), device=device)
    n_samples = 40
    occ = [((0, 7), s) for s in np.repeat(np.arange(n_samples), 9)]  # 360 occurrences, 40 samples
    occ += [((0, 8), s) for s in rng.integers(0, 6, mba_triton.CHUNK + 30)]
    occ += [
        ((int(t), int(rng.integers(0, ROWS[t]))), int(s))
        for t, s in zip(rng.integers(0, 2, 80), rng.integers(0, n_samples, 80), strict=True)
    ]
    rows, samples = [r for r, _ in occ], [s for _, s in occ]
    grads = rng.standard_normal((len(rows), max(DIMS))).astype(np.float32)
    run_update(KERNELS[kernel], views, mviews, counts, rows, grads, 0.1, 0.5, adagrad, samples, n_samples)
    n1 = [x.copy() for x in n0]
    for t, j in set(rows):
        n1[t][j] += len({s for r, s in occ if r == (t, j)})
    np.testing.assert_array_equal(counts.cpu().numpy(), np.concatenate(n1))
    assert_one_step(views, mviews, w0, n1, rows, grads, adagrad)


def loop_occurrences(ids, offsets, batch, feature_table, row_off, feature_col, stride, pooled):
    """Per lookup, by walking the bags: (linear row, gradient offset, sample)."""
    out = []
    for bag in range(len(offsets) - 1):
        f, s = divmod(bag, batch)
        for i in range(offsets[bag], offsets[bag + 1]):
            src = s * stride + feature_col[f] if pooled else i * stride
            out.append((ids[i] + row_off[feature_table[f]], src, s))
    return out


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton", pytest.param("triton-cuda", marks=CUDA)])
@pytest.mark.parametrize("pooled", [True, False])
@pytest.mark.parametrize("features", [[0], [1, 0, 1]])
def test_occurrences_match_a_loop_over_bags(impl, pooled, features):
    """Lookups → occurrences, for one feature and for three features over two tables (a table read
    by two features), with empty bags first, inside and last."""
    device = "cuda" if impl.endswith("cuda") else "cpu"
    fn = {"torch": mba.occurrences_torch, "cpp": mba_cpp.occurrences_cpp}.get(impl, mba_triton.occurrences_triton)
    rng = np.random.default_rng(5)
    batch = 7
    lengths = rng.integers(0, 5, batch * len(features))
    lengths[[0, 3, -1]] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(0, 20, offsets[-1])
    flat = torch.zeros(30 * 12 + 20 * 4, device=device)  # two tables in one storage, as FBGEMM lays out a group
    layout = mba.TableLayout.of(
        [flat[:360].view(30, 12), flat[360:].view(20, 4)], None, torch.zeros(50, dtype=torch.int32, device=device)
    )
    dims = [12, 4]
    cols = np.concatenate([[0], np.cumsum([dims[t] for t in features])[:-1]])
    stride = int(sum(dims[t] for t in features)) if pooled else 12
    bags = mba.Bags(batch, torch.tensor(features, device=device), torch.tensor(cols, device=device), pooled)
    lin, src, sample = fn(
        layout, bags, torch.tensor(ids, device=device), torch.tensor(offsets, device=device), stride, True
    )
    expected = loop_occurrences(ids.tolist(), offsets.tolist(), batch, features, [0, 30], cols.tolist(), stride, pooled)
    got = list(zip(lin.tolist(), src.tolist(), sample.tolist(), strict=True))
    assert got == expected


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


def test_triton_kernels_compile_for_the_gpu():
    """The Triton kernels, as the wrappers launch them, compile for an H100 (sm_90) with Triton's
    compiler and ptxas, here without a GPU (the interpreter above does not lower them)."""
    from tests.conftest import compiled_for_the_gpu

    p = compiled_for_the_gpu("-c", "from embedding import mba_compile; print(len(mba_compile.compile_kernels(90)))")
    assert int(p.stdout.split()[-1]) == 4 + 3 * 5 * 2  # occurrences; per dim, carry + update of 5 variants


@pytest.mark.parametrize("rows", [7, 10_000])  # a counting sort (at most 4 rows per occurrence), and the sort
def test_cpu_grouping_by_row_equals_a_stable_argsort(rows):
    """mba_cpp.segments_cpu against numpy: the touched rows, their offsets, each occurrence's
    gradient offset in row order (a row's occurrences in their order), and each row's table."""
    n = 500
    g = torch.Generator().manual_seed(3)
    flat = torch.zeros(rows * 4)  # two tables in one storage
    half = rows // 2
    layout = mba.TableLayout.of(
        [flat[: half * 4].view(half, 4), flat[half * 4 :].view(rows - half, 4)],
        None,
        torch.zeros(rows, dtype=torch.int32),
    )
    lin = torch.randint(0, rows, (n,), generator=g)
    src = torch.randperm(n, generator=g) * 3
    seg = mba_cpp.segments_cpu(lin, src, layout)
    want_rows, want_counts = np.unique(lin.numpy(), return_counts=True)
    np.testing.assert_array_equal(seg.rows.numpy(), want_rows)
    np.testing.assert_array_equal(seg.offsets.numpy(), np.concatenate([[0], np.cumsum(want_counts)]))
    np.testing.assert_array_equal(seg.src.numpy(), src.numpy()[np.argsort(lin.numpy(), kind="stable")])
    np.testing.assert_array_equal(seg.tab.numpy(), (want_rows >= half).astype(np.int64))
    with pytest.raises(RuntimeError, match=f"row {rows} outside"):
        mba_cpp.cpu_extension().group_rows(torch.tensor([0, rows]), torch.tensor([0, 1]), rows)


@pytest.mark.parametrize("path", ["cpp-dense", "cpp-grouped"])
@pytest.mark.parametrize("dim", [16, 32, 8])  # the dense sums' two unrolled widths, and the general loop
def test_cpp_paths_on_tables_of_one_dim(path, dim):
    """Both C++ paths on a group whose tables share one dim (as torchrec's groups mostly do)
    against the numpy step: row-wise Adagrad with λ over two steps, pooled-style gradients (many
    occurrences reading one gradient row); then a row outside the group is refused before any
    weight is written."""
    rng = np.random.default_rng(4)
    rows_of = [40, 9]
    w0 = [rng.standard_normal((r, dim)).astype(np.float32) for r in rows_of]
    flat = torch.tensor(np.concatenate([w.ravel() for w in w0]))
    views = [flat[: rows_of[0] * dim].view(-1, dim), flat[rows_of[0] * dim :].view(-1, dim)]
    momentum = torch.zeros(sum(rows_of))
    n = [rng.integers(1, 9, r).astype(np.int32) for r in rows_of]
    layout = mba.TableLayout.of(
        views, [momentum[: rows_of[0]], momentum[rows_of[0] :]], torch.tensor(np.concatenate(n))
    )
    ref_w, ref_s = w0, [np.zeros(r) for r in rows_of]
    for _ in range(2):
        occ = [(int(t), int(rng.integers(0, rows_of[t]))) for t in rng.integers(0, 2, 150)]
        bag_grads = rng.standard_normal((10, dim)).astype(np.float32)
        bag = rng.integers(0, 10, len(occ))
        lin = torch.tensor([sum(rows_of[:t]) + j for t, j in occ])
        src = torch.tensor(bag * dim)
        KERNELS[path](layout, lin, src, torch.tensor(bag_grads), mba.Rule("rowwise_adagrad", 0.1, eps=EPS), 0.4)
        ref_w, ref_s = numpy_step(ref_w, ref_s, n, occ, [bag_grads[b] for b in bag], 0.1, 0.4, True)
        for t in range(2):
            np.testing.assert_allclose(views[t].numpy(), ref_w[t], rtol=1e-5, atol=1e-5)
    before = flat.clone()
    with pytest.raises(RuntimeError, match=f"row {sum(rows_of)} outside"):
        KERNELS[path](
            layout,
            torch.tensor([0, sum(rows_of)] * 30),
            torch.zeros(60, dtype=torch.int64),
            torch.ones(dim),
            mba.Rule("rowwise_adagrad", 0.1),
            0.0,
        )
    assert torch.equal(flat, before)

"""The Parquet stream: coverage, rank partition, determinism, Arrow -> KJT fidelity, one-line errors."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedding.layout import FeatureLayout
from embedding.tables import hash_ids
from trainer.config import load_config
from trainer.data import DataError, ParquetStream, Piece, split

N_ITEMS, N_CATES = 50, 5
CONFIG = f"""
tables:
  - {{name: item, num_rows: {N_ITEMS}, dim: 4, features: [item_id, hist_item_id]}}
  - {{name: cate, num_rows: {N_CATES}, dim: 4, features: [cate_id, hist_cate_id]}}
"""


def rows_table(n: int, seed: int, first_user: int = 0) -> pa.Table:
    """n rows of the canonical schema; user_id is unique, so it identifies a row."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 13, n)
    off = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    hist = rng.integers(0, N_ITEMS, off[-1])
    item = rng.integers(0, N_ITEMS, n)
    return pa.table(
        {
            "label": pa.array(rng.integers(0, 2, n).astype(np.int8)),
            "user_id": pa.array(np.arange(first_user, first_user + n, dtype=np.int64)),
            "item_id": pa.array(item),
            "cate_id": pa.array(item % N_CATES),
            "hist_item_id": pa.ListArray.from_arrays(pa.array(off), pa.array(hist)),
            "hist_cate_id": pa.ListArray.from_arrays(pa.array(off), pa.array(hist % N_CATES)),
        }
    )


def write_files(dirpath, sizes=(500, 333, 41), row_group_size=100) -> dict[int, pa.Table]:
    dirpath.mkdir(parents=True, exist_ok=True)
    first = 0
    for i, n in enumerate(sizes):
        pq.write_table(
            rows_table(n, seed=i, first_user=first), dirpath / f"part-{i}.parquet", row_group_size=row_group_size
        )
        first += n
    return pq.read_table(sorted(dirpath.glob("*.parquet")))


def make_stream(tmp_path, paths=None, batch_size=32, max_hist_len=8, **kw) -> ParquetStream:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(CONFIG)
    layout = FeatureLayout.from_config(load_config(cfg_path))
    paths = paths or sorted(str(p) for p in (tmp_path / "d").glob("*.parquet"))
    return ParquetStream(paths, layout, batch_size=batch_size, max_hist_len=max_hist_len, prefetch=2, **kw)


def per_row(stream, epoch):
    """user_id -> (label, item, cate, hist items, hist cates) as the batches deliver them."""
    out, sizes = {}, []
    for b in stream.epoch(epoch):
        jt = b.sparse.to_dict()
        hist_i = jt["hist_item_id"].to_dense()
        hist_c = jt["hist_cate_id"].to_dense()
        for r, u in enumerate(b.users.tolist()):
            assert u not in out, f"row {u} delivered twice"
            out[u] = (
                int(b.labels[r]),
                int(jt["item_id"].values()[r]),
                int(jt["cate_id"].values()[r]),
                hist_i[r].tolist(),
                hist_c[r].tolist(),
            )
        sizes.append(len(b))
    return out, sizes


@pytest.mark.parametrize("batch_size", [1, 7, 32, 437])  # 874 rows: 437 divides, 7 and 32 do not
def test_every_row_exactly_once_with_its_own_values(tmp_path, batch_size):
    table = write_files(tmp_path / "d")
    n = table.num_rows
    stream = make_stream(tmp_path, batch_size=batch_size, max_hist_len=8)
    assert stream.num_rows == n and len(stream.units) == 5 + 4 + 1
    src = {u: i for i, u in enumerate(table["user_id"].to_pylist())}
    hist = table["hist_item_id"].to_pylist()
    for epoch in (0, 1):
        got, sizes = per_row(stream, epoch)
        assert sorted(got) == sorted(src)
        assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
        assert len(sizes) == -(-n // batch_size)
        for u, (label, item, cate, hi, hc) in got.items():
            i = src[u]
            assert label == table["label"][i].as_py() and item == table["item_id"][i].as_py()
            assert cate == item % N_CATES
            assert hi == hist[i][-8:]  # the most recent behaviours are kept, oldest first
            assert hc == [h % N_CATES for h in hi]


def users_of(stream, epoch, start=0, earlier=()):
    return [[u for u in b.users.tolist()] for b in stream.epoch(epoch, start, earlier)]


def test_ranks_take_contiguous_equal_shares_of_the_one_rank_order(tmp_path):
    write_files(tmp_path / "d")  # row groups of 100, 100, 100, 100, 100, 100, 100, 100, 33, 41 rows
    single = [u for b in users_of(make_stream(tmp_path), 3) for u in b]
    streams = [make_stream(tmp_path, rank=r, world_size=3) for r in range(3)]
    batches = [users_of(s, 3) for s in streams]
    assert [sum(map(len, b)) for b in batches] == [292, 291, 291]  # 874 rows: equal shares, ±1
    # rank r's rows are the r-th third of the one-rank sequence, in its order: nothing padded, nothing twice
    assert [u for b in batches for batch in b for u in batch] == single
    steps = -(-292 // 32)
    assert [len(b) for b in batches] == [steps] * 3 == [s.steps_for(3) for s in streams]
    assert all(len(batch) == 32 for b in batches for batch in b[:-1])
    assert [len(b[-1]) for b in batches] == [292 - 9 * 32, 291 - 9 * 32, 291 - 9 * 32]


def test_fewer_rows_than_ranks_for_a_last_step_join_the_step_before(tmp_path):
    write_files(tmp_path / "d", sizes=(194,))  # 194 = 2 × 96 + 2: 2 rows for 3 ranks
    streams = [make_stream(tmp_path, rank=r, world_size=3) for r in range(3)]
    assert [[len(b) for b in users_of(s, 0)] for s in streams] == [[32, 33], [32, 33], [32, 32]]


def test_loss_scale_makes_the_ranks_average_the_global_mean():
    seg = split([Piece(0, 0, 0, 194)], 3, 32)
    rng = np.random.default_rng(0)
    for k in range(seg.steps):
        losses = [rng.random(seg.batch_rows(r, k)) for r in range(3)]
        scales = [seg.loss_scale(k, len(x)) or 1.0 for x in losses]
        ranks_mean = sum(s * x.mean() for s, x in zip(scales, losses, strict=True)) / 3  # DDP's average
        assert ranks_mean == pytest.approx(np.concatenate(losses).mean(), rel=1e-12)
    assert seg.loss_scale(0, 32) is None  # equal batches: the plain mean, exactly


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("done", [1, 4, 9])
def test_a_segment_on_another_world_size_trains_exactly_the_rows_left(tmp_path, before, after, done):
    """Every row of the epoch exactly once over two segments of different world sizes, with the
    first stopped after `done` batches on every rank (a checkpoint in the middle of the epoch)."""
    write_files(tmp_path / "d")
    everything = sorted(u for b in users_of(make_stream(tmp_path), 2) for u in b)
    first = [users_of(make_stream(tmp_path, rank=r, world_size=before), 2)[:done] for r in range(before)]
    earlier = [[before, done]]
    second = [users_of(make_stream(tmp_path, rank=r, world_size=after), 2, 0, earlier) for r in range(after)]
    trained = [u for rank in first + second for b in rank for u in b]
    assert sorted(trained) == everything  # none twice, none lost
    # the second segment's shares are equal (±1) and its ranks agree on the number of steps
    rows = [sum(map(len, r)) for r in second]
    assert max(rows) - min(rows) <= 1 and len({len(r) for r in second}) == 1
    # and a same-size resume inside the second segment continues it batch for batch
    again = users_of(make_stream(tmp_path, rank=after - 1, world_size=after), 2, 2, earlier)
    assert again == second[-1][2:]


def test_more_ranks_than_rows_is_an_error(tmp_path):
    write_files(tmp_path / "d", sizes=(2,))
    make_stream(tmp_path, rank=1, world_size=2).check_rows("data.train")  # one row each: enough
    with pytest.raises(
        DataError, match="data.train: 2 row\\(s\\) in 1 file\\(s\\): .* for 3 ranks: every rank needs a row"
    ):
        make_stream(tmp_path, rank=2, world_size=3).check_rows("data.train")


def test_order_is_deterministic_per_seed_and_epoch(tmp_path):
    write_files(tmp_path / "d")

    def order(seed, epoch):
        return [u for b in make_stream(tmp_path, seed=seed).epoch(epoch) for u in b.users.tolist()]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 0)) == sorted(order(0, 1))


def test_hash_id_map_is_fixed_and_in_range():
    ids = np.array([0, 1, -5, 2**62, 123456789], dtype=np.int64)
    h = hash_ids(ids, 1000)
    assert ((h >= 0) & (h < 1000)).all()
    assert (h == hash_ids(ids.copy(), 1000)).all()
    assert len(set(hash_ids(np.arange(10000), 1 << 40).tolist())) == 10000  # a mix, not a mask


# ---------------------------------------------------------------- bad input: one line each


def bad_file(tmp_path, mutate) -> str:
    t = rows_table(300, seed=9)
    path = tmp_path / "bad.parquet"
    t = mutate(t)
    if t is not None:
        pq.write_table(t, path, row_group_size=100)
    return str(path)


def set_col(name, arr):
    return lambda t: t.set_column(t.schema.get_field_index(name), name, arr)


def label_with(value):
    def f(t):
        lab = t["label"].to_numpy().copy()
        lab[250] = value
        return set_col("label", pa.array(lab))(t)

    return f


def misaligned(t):
    h = t["hist_cate_id"].to_pylist()
    h[120] = h[120] + [1]
    return set_col("hist_cate_id", pa.array(h, pa.list_(pa.int64())))(t)


def out_of_range(t):
    h = t["hist_item_id"].to_pylist()
    h[10] = [N_ITEMS + 7]
    off_h = t["hist_cate_id"].to_pylist()
    off_h[10] = [1]
    t = set_col("hist_item_id", pa.array(h, pa.list_(pa.int64())))(t)
    return set_col("hist_cate_id", pa.array(off_h, pa.list_(pa.int64())))(t)


def null_label(t):
    lab = t["label"].to_pylist()
    lab[5] = None
    return set_col("label", pa.array(lab, pa.int8()))(t)


def unreadable(t):
    return None


CASES = {
    "unreadable": (unreadable, "bad.parquet: unreadable Parquet file"),
    "missing column": (lambda t: t.drop_columns(["cate_id"]), "bad.parquet: column 'cate_id': missing"),
    "mistyped column": (
        set_col("label", pa.array(np.zeros(300, np.float32))),
        "bad.parquet: column 'label': type float, expected int8",
    ),
    "mistyped list": (
        set_col("hist_item_id", pa.array([["a"]] * 300)),
        "bad.parquet: column 'hist_item_id': type list<element: string>, expected list<int64>",
    ),
    "null label": (null_label, "bad.parquet: row group 0: column 'label': 1 null value(s)"),
    "label not 0/1": (label_with(2), "bad.parquet: row group 2: column 'label': value 2 not in {0, 1}"),
    "id out of range": (out_of_range, "bad.parquet: row group 0: column 'hist_item_id': id 57 out of range [0, 50)"),
    "negative id": (
        set_col("item_id", pa.array(np.full(300, -1, np.int64))),
        "bad.parquet: row group 0: column 'item_id': id -1 out of range",
    ),
    "misaligned history": (
        misaligned,
        "bad.parquet: row group 1: column 'hist_cate_id': list length differs from 'hist_item_id' at row 20",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_file_row_group_column(tmp_path, case):
    mutate, message = CASES[case]
    path = bad_file(tmp_path, mutate)
    if case == "unreadable":
        (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError) as e:
        s = make_stream(tmp_path, paths=[path], shuffle=False)
        for _ in s.epoch(0):
            pass
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_loader_workers_deliver_the_same_batches_in_the_same_order(tmp_path):
    """data.loader_workers: row groups read in worker processes, the batches identical, one for
    one, to the reader's own (two epochs, two ranks, a resumed start); a bad row group read in a
    worker is the same one-line DataError."""
    import torch

    write_files(tmp_path / "d")

    def batches(stream, epoch, start=0):
        return [(b.sparse.values(), b.sparse.lengths(), b.labels, b.users) for b in stream.epoch(epoch, start)]

    for rank in (0, 1):
        plain = make_stream(tmp_path, rank=rank, world_size=2)
        pooled = make_stream(tmp_path, rank=rank, world_size=2, loader_workers=2)
        for epoch, start in ((0, 0), (1, 0), (1, 3)):
            want, got = batches(plain, epoch, start), batches(pooled, epoch, start)
            assert len(want) == len(got) > 0
            for w, g in zip(want, got, strict=True):
                assert all(torch.equal(a, b) for a, b in zip(w, g, strict=True))
    mutate, message = CASES["id out of range"]
    with pytest.raises(DataError, match=re.escape(message)):
        for _ in make_stream(tmp_path, paths=[bad_file(tmp_path, mutate)], shuffle=False, loader_workers=1).epoch(0):
            pass


def test_a_batch_moved_to_its_own_device_is_itself_and_to_another_a_copy():
    """The pipeline calls `batch.to(device)` every step: on the CPU that must not rebuild the KJTs
    (their offsets and per-key caches go with the batch); to another device every field moves."""
    import torch

    from trainer.batch import Batch, features_kjt

    kjt = features_kjt(["a"], [torch.tensor([2, 1], dtype=torch.int32)], [torch.tensor([3, 4, 5])])
    b = Batch(sparse=kjt, dense=torch.zeros(2, 0), labels=torch.tensor([0.0, 1.0]), users=torch.tensor([7, 8]))
    assert b.to("cpu") is b and b.to(torch.device("cpu")) is b
    m = b.to("meta")
    assert m is not b and {
        t.device.type for t in (m.sparse.values(), m.sparse.lengths(), m.dense, m.labels, m.users)
    } == {"meta"}

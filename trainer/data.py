"""Streaming Parquet click logs -> `Batch` (trainer.batch): the one Parquet reader.

The unit of work is a row group. Each epoch orders all row groups of all files by a permutation
seeded by (seed, epoch), and rank r of W reads every W-th of them. Rows are shuffled inside a row
group (seeded too), cut into batches with the remainder carried into the next row group, and the
last short batch of an epoch is kept: every row is seen exactly once per epoch.

Arrow list offsets become KJT lengths directly: no per-row Python anywhere. A background thread
reads and converts ahead of the trainer. A bad file stops the stream with a `DataError` naming the
file, row group and column.

DIEN's negatives (`neg_hist_*`, see embedding.layout) come from the file when it has them, aligned
with the history, or are drawn by `sample_negatives` per row group, seeded by (seed, epoch, row
group): the same negatives whatever the world size.
"""

from __future__ import annotations

import glob
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding.layout import FeatureLayout, is_sequence
from embedding.tables import hash_ids
from trainer.batch import Batch


class DataError(ValueError):
    """Bad input data: one line naming the file, row group and column. `rank_local`: found in a row
    group this rank read (other ranks may not have it), not in what every rank checks alike."""

    rank_local = False


def resolve_paths(spec: str) -> list[str]:
    """A file, a directory (its *.parquet) or a glob -> sorted file list; DataError if empty."""
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.parquet")))
    elif any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec))
    else:
        paths = [spec] if os.path.exists(spec) else []
    if not paths:
        raise DataError(f"{spec}: no Parquet files found")
    return paths


# ---------------------------------------------------------------------------------- columns


@dataclass
class _Chunk:
    """Rows in numpy: scalar columns, and list columns as (offsets, values)."""

    scalars: dict[str, np.ndarray]
    lists: dict[str, tuple[np.ndarray, np.ndarray]]
    n: int

    def take(self, idx: np.ndarray) -> _Chunk:
        lists = {}
        for k, (off, val) in self.lists.items():
            lengths = off[idx + 1] - off[idx]
            new_off = _offsets(lengths)
            within = np.arange(new_off[-1]) - np.repeat(new_off[:-1], lengths)
            lists[k] = (new_off, val[np.repeat(off[idx], lengths) + within])
        return _Chunk({k: v[idx] for k, v in self.scalars.items()}, lists, idx.size)

    def slice(self, a: int, b: int) -> _Chunk:
        lists = {k: (off[a : b + 1] - off[a], val[off[a] : off[b]]) for k, (off, val) in self.lists.items()}
        return _Chunk({k: v[a:b] for k, v in self.scalars.items()}, lists, b - a)

    @staticmethod
    def concat(a: _Chunk, b: _Chunk) -> _Chunk:
        lists = {}
        for k, (off_a, val_a) in a.lists.items():
            off_b, val_b = b.lists[k]
            lists[k] = (np.concatenate([off_a, off_b[1:] + off_a[-1]]), np.concatenate([val_a, val_b]))
        scalars = {k: np.concatenate([v, b.scalars[k]]) for k, v in a.scalars.items()}
        return _Chunk(scalars, lists, a.n + b.n)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    off = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


def _keep_last(off: np.ndarray, val: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncate each list to its last `max_len` items (the most recent behaviours)."""
    lengths = np.diff(off)
    if lengths.size == 0 or lengths.max() <= max_len:
        return off, val
    ends = np.repeat(off[1:], lengths)
    keep = np.arange(off[-1]) >= ends - max_len
    return _offsets(np.minimum(lengths, max_len)), val[keep]


def sample_negatives(
    lists: dict[str, tuple[np.ndarray, np.ndarray]],
    negatives: list[tuple[str, str]],
    how: str,
    rng: np.random.Generator,
    tries: int = 8,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A negative behaviour for every behaviour of a row group, aligned with the history.

    Each negative is another behaviour position of the row group, and every feature of the
    behaviour (item, category, ...) is taken from that one position, so a negative is a real
    (item, category) pair. `frequency`: positions uniformly (items in proportion to their clicks);
    `uniform`: one position per distinct item of the first behaviour feature, uniformly. A draw
    that hits the behaviour's own item is redrawn, up to `tries` times (DIEN: "the item set
    except the clicked item"; only a row group with a single item keeps some).
    """
    first = negatives[0][0]
    off, val = lists[first]
    if val.size == 0:
        return {n: (off, lists[h][1][:0].copy()) for h, n in negatives}
    pool = np.arange(val.size) if how == "frequency" else np.unique(val, return_index=True)[1]
    src = pool[rng.integers(0, pool.size, val.size)]
    for _ in range(tries):
        same = np.flatnonzero(val[src] == val)
        if same.size == 0:
            break
        src[same] = pool[rng.integers(0, pool.size, same.size)]
    return {n: (off, lists[h][1][src]) for h, n in negatives}


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


# ---------------------------------------------------------------------------------- reader


class ParquetStream:
    """Batches of one rank's share of a Parquet data set, epoch by epoch."""

    def __init__(
        self,
        paths: list[str],
        layout: FeatureLayout,
        batch_size: int,
        max_hist_len: int,
        dense_features: list[str] = (),
        negatives: str = "frequency",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        prefetch: int = 4,
    ):
        self.paths = list(paths)
        self.layout = layout
        self.batch_size = batch_size
        self.max_hist_len = max_hist_len
        self.dense_features = list(dense_features)
        self.negatives = negatives
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle = shuffle
        self.prefetch = prefetch
        self.units: list[tuple[str, int, int]] = []  # (file, row group, rows)
        self.has_p_click = True
        self.file_negatives: dict[str, bool] = {}  # file -> it has the neg_hist_* columns
        for path in self.paths:
            pf = self._open(path)
            self._check_schema(path, pf.schema_arrow)
            self.has_p_click &= "p_click" in pf.schema_arrow.names
            self.file_negatives[path] = bool(layout.negatives) and layout.negatives[0][1] in pf.schema_arrow.names
            md = pf.metadata
            self.units += [(path, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)]
        self._unit_id = {(path, rg): i for i, (path, rg, _) in enumerate(self.units)}
        neg = {n for _, n in layout.negatives}
        self.columns = ["label", "user_id", *(k for k in layout.keys if k not in neg), *self.dense_features]
        if self.has_p_click:
            self.columns.append("p_click")

    def check_rows(self, what: str) -> None:
        """DataError (one line) unless the data set has rows and every rank a row group to read."""
        files = f"{len(self.paths)} file(s): {self.paths[0]}{', …' if len(self.paths) > 1 else ''}"
        if self.num_rows == 0:
            raise DataError(f"{what}: no rows in {files}")
        if len(self.units) < self.world_size:
            raise DataError(
                f"{what}: {len(self.units)} row group(s) in {len(self.paths)} file(s) for {self.world_size} ranks "
                f"({self.paths[0]}{', …' if len(self.paths) > 1 else ''}): every rank needs at least one row group"
            )

    @property
    def num_rows(self) -> int:
        return sum(u[2] for u in self.units)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.units))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.units))

    def units_for(self, epoch: int, rank: int | None = None) -> list[tuple[str, int, int]]:
        """A rank's row groups for `epoch` (this rank's by default), in reading order."""
        rank = self.rank if rank is None else rank
        return [self.units[i] for i in self._order(epoch)[rank :: self.world_size]]

    def rows_per_rank(self, epoch: int) -> list[int]:
        return [sum(u[2] for u in self.units_for(epoch, r)) for r in range(self.world_size)]

    def rows_for(self, epoch: int) -> int:
        return self.rows_per_rank(epoch)[self.rank]

    def steps_for(self, epoch: int) -> int:
        """Batches every rank yields in `epoch` (the same on all ranks, see `epoch`)."""
        return -(-max(self.rows_per_rank(epoch)) // self.batch_size)

    # -- validation

    @staticmethod
    def _open(path: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{path}: unreadable Parquet file ({msg})") from None

    def _check_schema(self, path: str, schema: pa.Schema) -> None:
        def need(col: str, ok, what: str) -> None:
            if col not in schema.names:
                raise DataError(f"{path}: column '{col}': missing")
            t = schema.field(col).type
            if not ok(t):
                raise DataError(f"{path}: column '{col}': type {t}, expected {what}")

        need("label", _is_int, "int8 (0/1)")
        need("user_id", _is_int, "int64")
        candidates = {c for c, _ in self.layout.pairs}
        negatives = [n for _, n in self.layout.negatives]
        present = [n for n in negatives if n in schema.names]
        if present and len(present) < len(negatives):
            missing = next(n for n in negatives if n not in schema.names)
            raise DataError(
                f"{path}: column '{missing}': missing (the file has '{present[0]}': DIEN's negatives "
                "come from the file for every behaviour feature or for none)"
            )
        for f in self.layout.keys:
            if f in negatives and not present:
                continue  # sampled by the reader
            if f in candidates:
                need(f, _is_int, "int64 (one candidate per row)")
            elif is_sequence(f):
                need(f, lambda t: pa.types.is_list(t) and _is_int(t.value_type), "list<int64>")
            else:
                need(
                    f,
                    lambda t: _is_int(t) or (pa.types.is_list(t) and _is_int(t.value_type)),
                    "int64 or list<int64>",
                )
        for f in self.dense_features:
            need(f, pa.types.is_floating, "float32")
        if "p_click" in schema.names and not pa.types.is_floating(schema.field("p_click").type):
            raise DataError(f"{path}: column 'p_click': type {schema.field('p_click').type}, expected float32")

    def _read_unit(self, path: str, rg: int, epoch: int, unit_index: int, shuffle: bool | None = None) -> _Chunk:
        where = f"{path}: row group {rg}"
        from_file = self.file_negatives[path]
        columns = self.columns + [n for _, n in self.layout.negatives] * from_file
        try:
            table = pq.ParquetFile(path).read_row_group(rg, columns=columns)
        except (OSError, pa.ArrowException) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{where}: unreadable ({msg})") from None
        for name in columns:
            col = table.column(name)
            if col.null_count:
                raise DataError(f"{where}: column '{name}': {col.null_count} null value(s)")
        scalars: dict[str, np.ndarray] = {}
        lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        label = table.column("label").to_numpy()
        bad = (label != 0) & (label != 1)
        if bad.any():
            raise DataError(f"{where}: column 'label': value {label[bad][0]} not in {{0, 1}}")
        scalars["label"] = label.astype(np.float32)
        scalars["user_id"] = table.column("user_id").to_numpy().astype(np.int64)
        for f in self.layout.keys:
            if f not in table.column_names:
                continue  # a negative to sample, below
            arr = table.column(f).combine_chunks()
            if pa.types.is_list(arr.type):
                off = np.asarray(arr.offsets).astype(np.int64)
                if arr.values.null_count:
                    raise DataError(f"{where}: column '{f}': null id inside a list")
                val = arr.values.to_numpy()[off[0] : off[-1]].astype(np.int64)  # a writable copy
                off = off - off[0]
            else:
                val = arr.to_numpy().astype(np.int64)
                off = np.arange(val.size + 1, dtype=np.int64)
            lists[f] = (off, self._map_ids(f, val, where))
        # The features of one behaviour (item, category, ...) must align step by step.
        hist_feats = [h for _, h in self.layout.pairs] + [n for _, n in self.layout.negatives] * from_file
        for h in hist_feats[1:]:
            if not np.array_equal(lists[h][0], lists[hist_feats[0]][0]):
                row = int(np.flatnonzero(np.diff(lists[h][0]) != np.diff(lists[hist_feats[0]][0]))[0])
                raise DataError(
                    f"{where}: column '{h}': list length differs from '{hist_feats[0]}' at row {row} "
                    "(history lists must be aligned)"
                )
        for h in hist_feats:
            lists[h] = _keep_last(*lists[h], self.max_hist_len)
        if self.layout.negatives and not from_file:
            rng = np.random.default_rng([self.seed, epoch, self._unit_id[(path, rg)], 1])
            lists.update(sample_negatives(lists, list(self.layout.negatives), self.negatives, rng))
        if self.dense_features:
            dense = np.stack([table.column(f).to_numpy() for f in self.dense_features], 1)
            scalars["dense"] = dense.astype(np.float32)
        if self.has_p_click:
            scalars["p_click"] = table.column("p_click").to_numpy().astype(np.float32)
        chunk = _Chunk(scalars, lists, table.num_rows)
        if self.shuffle if shuffle is None else shuffle:
            perm = np.random.default_rng([self.seed, epoch, unit_index]).permutation(chunk.n)
            chunk = chunk.take(perm)
        return chunk

    def _map_ids(self, feature: str, ids: np.ndarray, where: str) -> np.ndarray:
        t = self.layout.table_of(feature)
        if t.id_map == "hash":
            return hash_ids(ids, t.num_rows)
        bad = (ids < 0) | (ids >= t.num_rows)
        if bad.any():
            raise DataError(
                f"{where}: column '{feature}': id {ids[bad][0]} out of range [0, {t.num_rows}) "
                f"of table '{t.name}' (id_map: identity)"
            )
        return ids

    # -- batches

    def _to_batch(self, c: _Chunk) -> Batch:
        keys = self.layout.keys
        lengths = np.concatenate([np.diff(c.lists[k][0]) for k in keys])
        values = np.concatenate([c.lists[k][1] for k in keys])
        kjt = KeyedJaggedTensor(
            keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths.astype(np.int32))
        )
        dense = c.scalars.get("dense")
        return Batch(
            sparse=kjt,
            dense=torch.from_numpy(dense) if dense is not None else torch.zeros(c.n, 0),
            labels=torch.from_numpy(c.scalars["label"]),
            users=torch.from_numpy(c.scalars["user_id"]),
            p_click=torch.from_numpy(c.scalars["p_click"]) if "p_click" in c.scalars else None,
        )

    def _chunks(self, epoch: int, cycle: bool, skip: int = 0) -> Iterator[_Chunk]:
        """This rank's row groups of `epoch` in reading order (over again if `cycle`), the first
        `skip` rows left out (whole row groups unread)."""
        units = self.units_for(epoch)
        if not units and cycle:
            self.check_rows("data")  # raises: this rank has no row group
        while True:
            for i, (path, rg, n) in enumerate(units):
                if skip >= n:
                    skip -= n
                    continue
                try:
                    chunk = self._read_unit(path, rg, epoch, i)
                except DataError as e:
                    e.rank_local = True
                    raise
                yield chunk.slice(skip, chunk.n) if skip else chunk
                skip = 0
            if not cycle:
                return

    def position(self, epoch: int, batches: int) -> dict:
        """Where this rank's batch number `batches` of `epoch` starts: the file, row group and
        row offset (in the row group's shuffled order) its first row comes from."""
        units = self.units_for(epoch)
        skip = batches * self.batch_size
        total = sum(u[2] for u in units)
        if units and skip >= total:  # past this rank's share: the padding cycles through it again
            skip %= total
        for path, rg, n in units:
            if skip < n:
                return {"epoch": epoch, "batches": batches, "file": path, "row_group": rg, "row_offset": skip}
            skip -= n
        return {"epoch": epoch, "batches": batches, "file": None, "row_group": None, "row_offset": 0}

    def row_groups(self) -> Iterator[tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]]:
        """Every row group of the data set in file order (all ranks' shares), checked and
        id-mapped like training data: (rows, {feature: (offsets, row ids)}) each, histories cut
        to max_hist_len, rows in file order."""
        for i, (path, rg, _) in enumerate(self.units):
            chunk = self._read_unit(path, rg, epoch=0, unit_index=i, shuffle=False)
            yield chunk.n, chunk.lists

    def _batches(self, epoch: int, total: int, start: int) -> Iterator[Batch]:
        own = self.rows_for(epoch)
        skip = start * self.batch_size
        buf: _Chunk | None = None
        left = total - skip  # rows still to emit, buffered ones included
        if left <= 0:
            return
        for chunk in self._chunks(epoch, cycle=total > own, skip=skip):
            have = buf.n if buf is not None else 0
            if have == left:
                break
            chunk = chunk.slice(0, min(chunk.n, left - have))
            buf = chunk if buf is None else _Chunk.concat(buf, chunk)
            while buf.n >= self.batch_size:
                yield self._to_batch(buf.slice(0, self.batch_size))
                buf = buf.slice(self.batch_size, buf.n)
                left -= self.batch_size
        if buf is not None and buf.n:
            yield self._to_batch(buf)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of `epoch` from batch number `start` on (a resumed run), prepared by a
        background thread `prefetch` batches ahead. Batch k is the same whether the epoch started
        at 0 or at any `start` <= k: row groups before the start are not read.

        Every rank yields the same number of batches of the same sizes, so that collectives line
        up and the global batch is world_size x batch_size rows: ranks with fewer rows than the
        largest rank's share continue from the start of their own share (padding; the first
        `rows_for(epoch)` rows are this rank's real rows, each exactly once). With one rank there
        is no padding.
        """
        return _prefetch(self._batches(epoch, max(self.rows_per_rank(epoch)), start), self.prefetch)


_END = object()


def _prefetch(it: Iterator[Batch], depth: int) -> Iterator[Batch]:
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=work, daemon=True, name="parquet-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # drain so the worker can observe `stop`
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def stream_from_config(
    cfg, split: str, rank: int = 0, world_size: int = 1, shuffle: bool | None = None
) -> ParquetStream:
    """The stream of `split` ('train' or 'test') as the config describes it."""
    spec = cfg.data.train if split == "train" else cfg.data.test
    return ParquetStream(
        resolve_paths(spec),
        FeatureLayout.from_config(cfg),
        batch_size=cfg.data.batch_size,
        max_hist_len=cfg.data.max_hist_len,
        dense_features=cfg.data.dense_features,
        negatives=cfg.data.negatives,
        seed=cfg.data.seed,
        rank=rank,
        world_size=world_size,
        shuffle=(split == "train") if shuffle is None else shuffle,
        prefetch=cfg.data.prefetch,
    )

"""Streaming Parquet click logs -> `Batch` (trainer.batch): the one Parquet reader.

The data position is global. Each epoch orders all row groups of all files by a permutation
seeded by (seed, epoch) and shuffles the rows inside each row group (seeded by the epoch and the
row group's place in that order): one sequence of rows, the same whatever the world size. A
`Segment` (a stretch of the epoch at one world size) cuts the rows it has left into W contiguous
shares of equal size (±1 row), one per rank, each cut into batches with the last one taking the
rest: every row is trained exactly once per epoch, no rank pads, and a rank reads only the row
groups of its share (those at a share's edge are read by both ranks, each keeping its part). A
checkpoint records the segments of its epoch as (world size, batches done) pairs, so a run resumed
on another world size trains exactly the rows not yet trained (trainer.loop.resume).

Arrow list offsets become KJT lengths directly: no per-row Python anywhere. A background thread
reads and converts ahead of the trainer; with `data.loader_workers` = K > 0, K worker processes
read and decode the row groups (the costly part: Parquet decoding, id mapping, the shuffle), K
ahead of the one being cut into batches, and the thread only cuts and assembles the batches: the
same batches in the same order as without workers. A bad file stops the stream with a `DataError` naming the
file, row group and column.

DIEN's negatives (`neg_hist_*`, see embedding.layout) come from the file when it has them, aligned
with the history, or are drawn by `sample_negatives` per row group, seeded by (seed, epoch, row
group): the same negatives whatever the world size.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding.layout import FeatureLayout, is_sequence
from embedding.tables import hash_ids
from trainer import storage
from trainer.batch import Batch, features_kjt


class DataError(ValueError):
    """Bad input data: one line naming the file, row group and column. `rank_local`: found in a row
    group this rank read (other ranks may not have it), not in what every rank checks alike."""

    rank_local = False


def resolve_paths(spec: str) -> list[str]:
    """A file, a directory (its *.parquet) or a glob, local or a URI (trainer.storage) -> sorted
    file list; DataError if empty."""
    try:
        paths = storage.files(spec)
        if len(paths) != 1 or paths[0] != spec:  # a directory or a glob: its Parquet files
            paths = [p for p in paths if p.endswith(".parquet")]
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    if not paths:
        hint = ""
        if os.environ.get("DINREC_RAY_JOB") and not storage.is_uri(spec) and not os.path.isabs(spec):
            hint = (
                " (under `ray job submit` a relative path is inside the uploaded working directory, which "
                "leaves out what .gitignore lists, data/ included: give a URI such as s3://… or a path every node has)"
            )
        raise DataError(f"{spec}: no Parquet files found{hint}")
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


# ---------------------------------------------------------------------------------- the epoch's rows


@dataclass(frozen=True)
class Piece:
    """Rows [start, end) of row group `unit` (an index into ParquetStream.units), in the row
    group's shuffled order; `order`: the row group's place in the epoch's order."""

    unit: int
    order: int
    start: int
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.start


def cut(pieces: Sequence[Piece], a: int, b: int) -> list[Piece]:
    """Rows [a, b) of the row sequence that `pieces` make, as pieces."""
    out, pos = [], 0
    for p in pieces:
        lo, hi = max(a, pos), min(b, pos + p.rows)
        if lo < hi:
            out.append(Piece(p.unit, p.order, p.start + lo - pos, p.start + hi - pos))
        pos += p.rows
        if pos >= b:
            break
    return out


@dataclass(frozen=True)
class Segment:
    """A stretch of an epoch trained at one world size.

    Its rows (a sequence of pieces in the epoch's global order) are cut into `world_size`
    contiguous shares of equal size (±1 row); every rank trains `steps` batches of `batch_size`
    rows of its share, the last batch taking the rest. So every row of the segment is trained
    once, by one rank, and no rank pads. When fewer rows than ranks would be left for a last
    step, those rows join the step before (one more row in some ranks' last batch).
    """

    world_size: int
    batch_size: int
    shares: tuple[tuple[Piece, ...], ...]
    rows: tuple[int, ...]
    steps: int

    def batch_rows(self, rank: int, k: int) -> int:
        """Rows of `rank`'s batch number k."""
        return self.batch_size if k < self.steps - 1 else self.rows[rank] - (self.steps - 1) * self.batch_size

    def global_rows(self, k: int) -> int:
        """Rows of global batch number k (every rank's batch k)."""
        return sum(self.batch_rows(r, k) for r in range(self.world_size))

    def rows_through(self, k: int) -> int:
        """Rows of the segment's first k global batches."""
        if k >= self.steps:
            return sum(self.rows)
        return k * self.batch_size * self.world_size

    def consumed(self, rank: int, batches: int) -> int:
        """Rows of `rank`'s share in its first `batches` batches."""
        return self.rows[rank] if batches >= self.steps else batches * self.batch_size

    def remaining(self, batches: int) -> list[Piece]:
        """The segment's rows not yet trained after `batches` batches on every rank, in order."""
        return [p for r, share in enumerate(self.shares) for p in cut(share, self.consumed(r, batches), self.rows[r])]

    def loss_scale(self, k: int, n: int) -> float | None:
        """What a rank's mean loss over its n rows of batch k is multiplied by so that the ranks'
        gradients, averaged, are the global batch's mean gradient: n·W / (rows of the global
        batch); None where that is exactly 1 (every rank has the same rows)."""
        total = self.global_rows(k)
        return None if n * self.world_size == total else n * self.world_size / total


def split(pieces: Sequence[Piece], world_size: int, batch_size: int) -> Segment:
    """The segment of `pieces` on `world_size` ranks (see `Segment`)."""
    total = sum(p.rows for p in pieces)
    steps = max(1, -(-total // (world_size * batch_size)))
    if steps > 1 and total < world_size * (steps - 1) * batch_size + world_size:
        steps -= 1  # fewer rows than ranks for a last step: they join the step before
    base, extra = divmod(total, world_size)
    rows = tuple(base + (r < extra) for r in range(world_size))
    bounds = np.concatenate([[0], np.cumsum(rows)]).tolist()
    shares = tuple(tuple(cut(pieces, bounds[r], bounds[r + 1])) for r in range(world_size))
    return Segment(world_size, batch_size, shares, rows, steps)


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
        loader_workers: int = 0,
        pin_memory: bool = False,
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
        self.loader_workers = loader_workers
        self.pin_memory = pin_memory  # batches in page-locked memory: the GPU copy runs asynchronously
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._args = dict(
            paths=self.paths,
            layout=layout,
            batch_size=batch_size,
            max_hist_len=max_hist_len,
            dense_features=self.dense_features,
            negatives=negatives,
            seed=seed,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
        )
        self.units: list[tuple[str, int, int]] = []  # (file, row group, rows)
        self.has_p_click = True
        self.file_negatives: dict[str, bool] = {}  # file -> it has the neg_hist_* columns
        self.metadata: dict[str, pq.FileMetaData] = {}  # read once: a row group read needs no footer read
        for path in self.paths:
            pf = self._open(path)
            self.metadata[path] = pf.metadata
            self._check_schema(path, pf.schema_arrow)
            self.has_p_click &= "p_click" in pf.schema_arrow.names
            self.file_negatives[path] = bool(layout.negatives) and layout.negatives[0][1] in pf.schema_arrow.names
            md = pf.metadata
            self.units += [(path, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)]
        self._unit_id = {(path, rg): i for i, (path, rg, _) in enumerate(self.units)}
        self._segments: dict[tuple, Segment] = {}
        neg = {n for _, n in layout.negatives}
        self.columns = ["label", "user_id", *(k for k in layout.keys if k not in neg), *self.dense_features]
        if self.has_p_click:
            self.columns.append("p_click")

    def check_rows(self, what: str) -> None:
        """DataError (one line) unless the data set has at least one row for every rank."""
        files = f"{len(self.paths)} file(s): {self.paths[0]}{', …' if len(self.paths) > 1 else ''}"
        if self.num_rows == 0:
            raise DataError(f"{what}: no rows in {files}")
        if self.num_rows < self.world_size:
            raise DataError(
                f"{what}: {self.num_rows} row(s) in {files} for {self.world_size} ranks: every rank needs a row"
            )

    @property
    def num_rows(self) -> int:
        return sum(u[2] for u in self.units)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.units))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.units))

    def segment(self, epoch: int, earlier: Sequence[Sequence[int]] = ()) -> Segment:
        """The rows every rank trains in `epoch` after the epoch's `earlier` segments, each a
        (world size, batches done) pair: the epoch's rows in its global order, less those the earlier
        segments trained, split over this stream's world size (see `Segment`)."""
        key = (epoch, tuple(tuple(e) for e in earlier))
        if key not in self._segments:
            pieces = [Piece(int(u), p, 0, self.units[u][2]) for p, u in enumerate(self._order(epoch))]
            for world, batches in earlier:
                pieces = split(pieces, world, self.batch_size).remaining(batches)
            self._segments[key] = split(pieces, self.world_size, self.batch_size)
        return self._segments[key]

    def rows_for(self, epoch: int) -> int:
        """This rank's rows of `epoch` (a whole epoch: no earlier segment)."""
        return self.segment(epoch).rows[self.rank]

    def steps_for(self, epoch: int, earlier: Sequence[Sequence[int]] = ()) -> int:
        """Batches every rank yields in the segment of `epoch` after `earlier` (the same on all ranks)."""
        return self.segment(epoch, earlier).steps

    # -- validation

    def _open(self, path: str, where: str | None = None) -> pq.ParquetFile:
        """The Parquet file (on a URI: read by range requests, row group by row group)."""
        try:
            return pq.ParquetFile(storage.open_input(path), metadata=self.metadata.get(path))
        except storage.StorageError as e:
            raise DataError(f"{where}: {str(e).removeprefix(path + ': ')}" if where else str(e)) from None
        except (OSError, pa.ArrowException) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            text = f"{where}: unreadable ({msg})" if where else f"{path}: unreadable Parquet file ({msg})"
            raise DataError(text) from None

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

    def _read_unit(self, path: str, rg: int, epoch: int, order: int, shuffle: bool | None = None) -> _Chunk:
        """A row group, checked, id-mapped and (training) shuffled by (seed, epoch, `order`: its
        place in the epoch's order): the same rows in the same order whichever rank reads it."""
        where = f"{path}: row group {rg}"
        from_file = self.file_negatives[path]
        columns = self.columns + [n for _, n in self.layout.negatives] * from_file
        try:
            table = self._open(path, where).read_row_group(rg, columns=columns)
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
            perm = np.random.default_rng([self.seed, epoch, order]).permutation(chunk.n)
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

    def _to_batch(self, c: _Chunk, seg: Segment, k: int) -> Batch:
        def kjt(keys: list[str]) -> KeyedJaggedTensor:
            lengths = [torch.from_numpy(np.diff(c.lists[k][0]).astype(np.int32)) for k in keys]
            return features_kjt(keys, lengths, [torch.from_numpy(c.lists[k][1]) for k in keys])

        pooled = self.layout.pooled_features
        dense = c.scalars.get("dense")
        return Batch(
            sparse=kjt(self.layout.seq_features),
            pooled=kjt(pooled) if pooled else None,
            dense=torch.from_numpy(dense) if dense is not None else torch.zeros(c.n, 0),
            labels=torch.from_numpy(c.scalars["label"]),
            users=torch.from_numpy(c.scalars["user_id"]),
            p_click=torch.from_numpy(c.scalars["p_click"]) if "p_click" in c.scalars else None,
            loss_scale=seg.loss_scale(k, c.n),
        )

    def _read_pieces(self, epoch: int, pieces: list[Piece]) -> Iterator[_Chunk]:
        """The rows of `pieces` in order; a row group is read once for consecutive pieces of it
        (by the loader workers, `loader_workers` row groups ahead, when there are any)."""
        runs: list[list[Piece]] = []  # consecutive pieces of one row group
        for piece in pieces:
            if runs and runs[-1][0].unit == piece.unit:
                runs[-1].append(piece)
            else:
                runs.append([piece])
        for run, chunk in zip(runs, self._read_units(epoch, runs), strict=True):
            for piece in run:
                yield chunk.slice(piece.start, piece.end)

    def _read_units(self, epoch: int, runs: list[list[Piece]]) -> Iterator[_Chunk]:
        jobs = [(*self.units[run[0].unit][:2], epoch, run[0].order) for run in runs]
        try:
            if not self.loader_workers:
                for job in jobs:
                    yield self._read_unit(*job)
                return
            pool = self._loader_pool()
            ahead: list[concurrent.futures.Future] = []
            for i in range(len(jobs)):
                while len(ahead) < self.loader_workers + 1 and i + len(ahead) < len(jobs):
                    ahead.append(pool.submit(_read_in_worker, *jobs[i + len(ahead)]))
                yield ahead.pop(0).result()
        except DataError as e:
            e.rank_local = True
            raise

    def close(self) -> None:
        """Stop the loader workers, if any (they also stop on their own when this process ends)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _loader_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        """The loader's worker processes (started on first use, kept for the stream's life). They
        are spawned, not forked: the trainer has threads (gloo, the prefetcher) by then."""
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.loader_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(self._args,),
            )
        return self._pool

    def position(self, epoch: int, batches: int, earlier: Sequence[Sequence[int]] = ()) -> dict:
        """Where this rank's batch number `batches` of the segment of `epoch` after `earlier` starts:
        the file, row group and row offset (in the row group's shuffled order) of its first row."""
        seg = self.segment(epoch, earlier)
        where = {"epoch": epoch, "batches": batches, "file": None, "row_group": None, "row_offset": 0}
        ahead = cut(seg.shares[self.rank], seg.consumed(self.rank, batches), seg.rows[self.rank])
        if ahead:
            path, rg, _ = self.units[ahead[0].unit]
            where.update(file=path, row_group=rg, row_offset=ahead[0].start)
        return where

    def row_groups(self) -> Iterator[tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]]:
        """Every row group of the data set in file order (all ranks' shares), checked and
        id-mapped like training data: (rows, {feature: (offsets, row ids)}) each, histories cut
        to max_hist_len, rows in file order."""
        for i, (path, rg, _) in enumerate(self.units):
            chunk = self._read_unit(path, rg, epoch=0, order=i, shuffle=False)
            yield chunk.n, chunk.lists

    def _batches(self, epoch: int, seg: Segment, start: int) -> Iterator[Batch]:
        bs, last = self.batch_size, seg.steps - 1
        k = start
        if k > last:
            return
        buf: _Chunk | None = None
        pieces = cut(seg.shares[self.rank], seg.consumed(self.rank, start), seg.rows[self.rank])
        for chunk in self._read_pieces(epoch, pieces):
            buf = chunk if buf is None else _Chunk.concat(buf, chunk)
            while k < last and buf.n >= bs:
                yield self._ready(self._to_batch(buf.slice(0, bs), seg, k))
                buf, k = buf.slice(bs, buf.n), k + 1
        if buf is not None and buf.n:  # the last batch: the rest of the share
            yield self._ready(self._to_batch(buf, seg, k))

    def _ready(self, batch: Batch) -> Batch:
        return batch.pin_memory() if self.pin_memory else batch

    def epoch(self, epoch: int, start: int = 0, earlier: Sequence[Sequence[int]] = ()) -> Iterator[Batch]:
        """This rank's batches of the segment of `epoch` after `earlier` (see `segment`), from batch
        number `start` on (a resumed run), prepared by a background thread `prefetch` batches ahead.
        Batch k is the same whether the segment started at 0 or at any `start` <= k: row groups
        before the start are not read. Every rank yields `steps_for` batches; every row of the
        segment is in exactly one rank's batches, once.
        """
        return _prefetch(self._batches(epoch, self.segment(epoch, earlier), start), self.prefetch)


_END = object()

_WORKER: ParquetStream | None = None  # a loader worker's stream


def _start_worker(args: dict) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = ParquetStream(**args, prefetch=1)
    parent = os.getppid()

    def orphaned() -> None:  # the trainer may leave by os._exit or be killed: no shutdown reaches us
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True, name="loader-parent-watch").start()


def _read_in_worker(path: str, rg: int, epoch: int, order: int) -> _Chunk:
    return _WORKER._read_unit(path, rg, epoch, order)


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
    """The stream of `split` ('train', 'test' or 'valid') as the config describes it."""
    spec = {"train": cfg.data.train, "test": cfg.data.test, "valid": cfg.data.valid}[split]
    if spec is None:
        raise DataError(f"data.{split}: not set")
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
        loader_workers=cfg.data.loader_workers if split == "train" else 0,
        pin_memory=cfg.launch.use_gpu and split == "train",
    )

"""What the converters share: one-line input errors, id re-indexing, the history builder, the
user split and the Parquet writer."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from trainer.config import ConfigError


class InputError(ConfigError):
    """A malformed input file: one line naming file:line and what is wrong."""


def add_output_arguments(p, max_hist_len: int) -> None:
    """The arguments every converter takes: --out, --max-hist-len, --no-progress."""
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--max-hist-len", type=int, default=max_hist_len, help="behaviours kept per row (default: %(default)s)"
    )
    p.add_argument("--no-progress", action="store_true")


def check_max_hist_len(converter: str, max_hist_len: int) -> None:
    if max_hist_len < 1:
        raise InputError(f"convert {converter}: --max-hist-len must be >= 1, got {max_hist_len}")


def read_delimited(
    path: Path,
    delimiter: str,
    names: list[str] | None,
    types: dict[str, pa.DataType],
    skip_header: bool = False,
    encoding: str = "utf8",
) -> pa.Table:
    """A delimited text file with pyarrow's CSV reader; the first malformed line (wrong number of
    fields, a value that does not parse) raises InputError with file:line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    bad: list = []

    def on_invalid(row) -> str:
        bad.append(row)
        return "error"

    read = pacsv.ReadOptions(
        column_names=names, skip_rows=1 if skip_header else 0, encoding=encoding, use_threads=False, block_size=1 << 24
    )
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False, invalid_row_handler=on_invalid)
    convert = pacsv.ConvertOptions(column_types=types, strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        return pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as e:
        if bad:
            r = bad[0]
            line = (r.number + (1 if skip_header else 0)) if r.number is not None else "?"
            raise InputError(
                f"{path}:{line}: expected {r.expected_columns} fields, got {r.actual_columns} ({r.text[:60]!r})"
            ) from None
        raise InputError(_value_error(path, str(e), delimiter, skip_header, encoding)) from None


def _value_error(path: Path, message: str, delimiter: str, skip_header: bool, encoding: str) -> str:
    """Arrow's conversion error with the line it happened on (found by re-reading the text)."""
    first = message.splitlines()[0]
    if "CSV conversion error" in first and "'" in first:
        value = first.split("'")[1] if first.count("'") >= 2 else None
        col = first.split("column #")[1].split(":")[0] if "column #" in first else None
        if value is not None and col is not None and col.isdigit():
            with open(path, encoding=encoding, errors="replace") as f:
                for n, text in enumerate(f, 1):
                    if skip_header and n == 1:
                        continue
                    fields = text.rstrip("\n").split(delimiter)
                    if int(col) < len(fields) and fields[int(col)] == value:
                        return f"{path}:{n}: field {int(col) + 1}: cannot parse {value!r}"
    return f"{path}: {first}"


def reindex(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Original ids (any type, strings too) -> contiguous int64 row ids in order of first
    appearance, and the dictionary (row id -> original id)."""
    enc = pc.dictionary_encode(values)
    if isinstance(enc, pa.ChunkedArray):
        enc = (
            enc.unify_dictionaries().combine_chunks()
            if enc.num_chunks
            else pa.DictionaryArray.from_arrays(pa.array([], pa.int32()), pa.array([], values.type))
        )
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary


def lookup(keys: np.ndarray | pa.Array, dictionary: pa.Array) -> np.ndarray:
    """Row ids of `keys` in a dictionary from `reindex` (-1 where absent)."""
    idx = pc.index_in(
        pa.array(keys) if not isinstance(keys, pa.Array | pa.ChunkedArray) else keys, value_set=dictionary
    )
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def test_users(user_keys: list[str], seed: int | str, test_fraction: float) -> np.ndarray:
    """A seeded hash split of users (by their original id): True for test users."""
    h = np.array([zlib.crc32(f"{seed}/{u}".encode()) for u in user_keys], np.uint64)
    return (h % np.uint64(1_000_000)) < np.uint64(round(test_fraction * 1_000_000))


def valid_users(user_keys: list[str], seed: int, valid_fraction: float, is_test: np.ndarray) -> np.ndarray:
    """The validation users, carved from the training users (not the test users) by a second
    seeded hash: True for about `valid_fraction` of them. The test set stays the one of the same
    seed without a validation split."""
    if valid_fraction == 0:
        return np.zeros(len(user_keys), bool)
    return ~is_test & test_users(user_keys, f"{seed}/valid", valid_fraction)


def histories(user: np.ndarray, order_key: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by (user, time, input position) and, for each row, its history: the same user's
    earlier rows, at most the `max_len` most recent, oldest first.

    -> (order: the row permutation, offsets [n+1], positions [offsets[-1]] into the sorted rows).
    """
    n = user.size
    order = np.lexsort((np.arange(n), order_key, user))  # ties in time keep the input order
    u = user[order]
    start = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if n else np.zeros(0, np.int64)
    first = np.repeat(start, np.diff(np.r_[start, n]))  # first sorted row of each row's user
    k = np.arange(n) - first  # earlier rows of the same user
    lengths = np.minimum(k, max_len)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    positions = np.repeat(np.arange(n) - lengths, lengths) + within
    return order, offsets, positions


SPLITS = ("train", "valid", "test")


class Writer:
    """DIR/{train,valid,test}/part-NNN.parquet in row groups, a progress bar, and convert.json.
    `splits` are the ones this conversion writes; the old parts of every split are removed (a
    validation set of an earlier conversion must not outlive it)."""

    def __init__(
        self,
        out: Path,
        row_group_size: int = 65536,
        rows_per_file: int = 4_000_000,
        progress: bool = True,
        total: int | None = None,
        splits: tuple[str, ...] = ("train", "test"),
    ):
        self.out = Path(out)
        self.row_group_size, self.rows_per_file = row_group_size, rows_per_file
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.files: dict[str, int] = dict.fromkeys(splits, 0)
        self.in_file: dict[str, int] = dict.fromkeys(splits, 0)
        self.rows = dict.fromkeys(splits, 0)
        self.clicks = dict.fromkeys(splits, 0)
        for split in SPLITS:
            for old in (self.out / split).glob("part-*.parquet"):
                old.unlink()
        for split in splits:
            (self.out / split).mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(
            total=total, unit="rows", unit_scale=True, desc="convert", disable=not progress, mininterval=1.0
        )

    def write(self, split: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        w = self.writers.get(split)
        if w is None or self.in_file[split] >= self.rows_per_file:
            if w is not None:
                w.close()
            path = self.out / split / f"part-{self.files[split]:03d}.parquet"
            self.files[split] += 1
            self.in_file[split] = 0
            w = self.writers[split] = pq.ParquetWriter(path, table.schema)
        w.write_table(table, row_group_size=self.row_group_size)
        self.in_file[split] += table.num_rows
        self.rows[split] += table.num_rows
        self.clicks[split] += int(pc.sum(table["label"]).as_py() or 0)
        self.bar.update(table.num_rows)

    def close(self, summary: dict) -> dict:
        for w in self.writers.values():
            w.close()
        self.bar.close()
        out = {
            "out": str(self.out),
            "rows": self.rows,
            "ctr": {k: round(self.clicks[k] / max(self.rows[k], 1), 6) for k in self.rows},
            **summary,
        }
        (self.out / "convert.json").write_text(json.dumps(out, indent=2))
        return out


def write_vocab(out: Path, name: str, dictionary: pa.Array, extra: dict[str, pa.Array] | None = None) -> None:
    """DIR/vocab/<name>.parquet: row, original id (and extra columns such as a title)."""
    (Path(out) / "vocab").mkdir(parents=True, exist_ok=True)
    cols = {"row": pa.array(np.arange(len(dictionary), dtype=np.int64)), "id": dictionary, **(extra or {})}
    pq.write_table(pa.table(cols), Path(out) / "vocab" / f"{name}.parquet")


def list_column(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64)), pa.array(values.astype(np.int64))
    )


TIME_COLUMNS = {"hour": 24, "weekday": 7, "month": 12}  # context columns of a timestamp, and their values


def time_columns(ts: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Context columns of Unix timestamps, UTC: `hour` 0–23, `weekday` 0 (Monday) – 6, `month` 0
    (January) – 11 (1970-01-01 was a Thursday)."""
    t = ts.astype(np.int64)
    out = {
        "hour": lambda: (t // 3600) % 24,
        "weekday": lambda: (t // 86400 + 3) % 7,
        "month": lambda: t.astype("datetime64[s]").astype("datetime64[M]").astype(np.int64) % 12,
    }
    return {n: out[n]() for n in names}


def impressions_table(
    label: np.ndarray,
    user: np.ndarray,
    item: np.ndarray,
    cate: np.ndarray,
    offsets: np.ndarray,
    hist_item: np.ndarray,
    hist_cate: np.ndarray,
    ts: np.ndarray,
    extra: dict[str, np.ndarray] | None = None,
) -> pa.Table:
    cols = {
        "label": pa.array(label.astype(np.int8)),
        "user_id": pa.array(user.astype(np.int64)),
        "item_id": pa.array(item.astype(np.int64)),
        "cate_id": pa.array(cate.astype(np.int64)),
        "hist_item_id": list_column(offsets, hist_item),
        "hist_cate_id": list_column(offsets, hist_cate),
        "ts": pa.array(ts.astype(np.int64)),
    }
    for k, v in (extra or {}).items():
        cols[k] = pa.array(v.astype(np.int64))
    return pa.table(cols)

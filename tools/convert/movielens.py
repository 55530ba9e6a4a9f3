"""MovieLens ratings -> impressions, DIN paper §6.1:

- label: rating >= 4 -> 1 (the paper: "rating of 4 and 5 to be positive"), else 0;
- category: the movie's genre. A movie with several genres takes the first one its item file
  lists (RecBole and movies.dat: the order of the genre list; u.item: the order of the genre
  flags); a movie with none, or missing from the item file, gets the category "(no genre)";
- history: the user's earlier ratings (any rating, as the paper's "user rated movie_id_list"),
  in time order, ties in time kept in file order, the most recent `--max-hist-len`;
- split by user (as the paper): a seeded hash of the original user id puts
  `--test-fraction` of the users and all their rows in the test set;
- ids re-indexed to contiguous rows (string ids allowed), user-profile columns (optional) too;
- profile (with a user file): gender, age, occupation, zip_code and zip_prefix (the zip code's
  first character: the US postal region); ages given in years (100K) are bucketed into the 1M
  file's age groups (1: under 18, 18: 18–24, 25, 35, 45, 50, 56: 56 and over), so every format
  has the same age values;
- context: `hour` (0–23) and `weekday` (0 Monday … 6 Sunday) of the rating's timestamp, UTC.

Input formats, told apart by file name: RecBole atomic files (`*.inter`, `*.item`, `*.user`: tab
separated, a typed header such as `user_id:token`, genres space separated in `class` or
`genre`); GroupLens 100K (`u.data`, `u.item`, `u.user`); 1M/10M (`ratings.dat`, `movies.dat`,
`users.dat`, `::` separated); 20M/25M (`ratings.csv`, `movies.csv`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tools.convert.common import (
    SPLITS,
    TIME_COLUMNS,
    InputError,
    Writer,
    add_output_arguments,
    check_max_hist_len,
    histories,
    impressions_table,
    lookup,
    read_delimited,
    reindex,
    test_users,
    time_columns,
    valid_users,
    write_vocab,
)

NO_GENRE = "(no genre)"
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)  # MovieLens-1M's age codes: each the lower end of its group
U_ITEM_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "movielens",
        help="MovieLens (RecBole atomic or GroupLens files) -> Parquet, DIN §6.1",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--inter", required=True, help="ratings: *.inter, u.data, ratings.dat or ratings.csv")
    p.add_argument("--item", required=True, help="movies: *.item, u.item, movies.dat or movies.csv")
    p.add_argument("--user", help="optional user profiles: *.user, u.user or users.dat")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.278,
        help="share of users in the test set (default: %(default)s, as 38,493 of 138,493 in the paper)",
    )
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=0.0,
        help="share of the training users held out as a validation set in OUT/valid (data.valid), for "
        "choosing hyper-parameters and the best epoch; the test set is unchanged (default: %(default)s, none)",
    )
    p.add_argument("--seed", type=int, default=0, help="the user split's hash seed (default: %(default)s)")
    add_output_arguments(p, max_hist_len=100)


# ---- readers: each returns plain columns ------------------------------------------------------


def _is_recbole(path: Path) -> bool:
    """RecBole atomic files end in .inter/.item/.user; GroupLens 100K's u.item and u.user do too."""
    return path.suffix in (".inter", ".item", ".user") and path.name not in ("u.item", "u.user")


def _recbole(path: Path) -> tuple[pa.Table, dict[str, str]]:
    """A RecBole atomic file: header `name:type` fields, tab separated. -> table with plain
    names (all columns as strings), {name: type}."""
    with open(path, encoding="utf8") as f:
        header = f.readline().rstrip("\n").split("\t")
    fields = {}
    for i, h in enumerate(header, 1):
        name, _, kind = h.partition(":")
        if not name or kind not in ("token", "token_seq", "float", "float_seq"):
            raise InputError(f"{path}:1: header field {i} {h!r} is not name:token|token_seq|float|float_seq")
        fields[name] = kind
    table = read_delimited(path, "\t", list(fields), {n: pa.string() for n in fields}, skip_header=True)
    return table, fields


def _need(path: Path, table: pa.Table, *names: str) -> None:
    for n in names:
        if n not in table.column_names:
            raise InputError(f"{path}: no column {n!r} (has {', '.join(table.column_names)})")


def _numbers(path: Path, column: pa.Array, name: str) -> np.ndarray:
    try:
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        strings = column.to_pylist()
        for i, s in enumerate(strings):
            try:
                float(s)
            except ValueError:
                raise InputError(f"{path}:{i + 2}: column {name!r}: {s!r} is not a number") from None
        raise


def read_ratings(path: Path) -> tuple[pa.Array, pa.Array, np.ndarray, np.ndarray]:
    """-> user ids, item ids (as strings), ratings, timestamps."""
    path = Path(path)
    name = path.name
    if _is_recbole(path):
        t, _ = _recbole(path)
        _need(path, t, "user_id", "item_id", "rating", "timestamp")
        return (
            t["user_id"].combine_chunks(),
            t["item_id"].combine_chunks(),
            _numbers(path, t["rating"].combine_chunks(), "rating"),
            _numbers(path, t["timestamp"].combine_chunks(), "timestamp"),
        )
    if name.endswith(".dat"):  # user::item::rating::ts -> ':' fields 0, 2, 4, 6
        names = ["u", "_1", "i", "_2", "r", "_3", "t"]
        t = read_delimited(path, ":", names, {"u": pa.string(), "i": pa.string(), "r": pa.float64(), "t": pa.float64()})
    elif name.endswith(".csv"):  # userId,movieId,rating,timestamp with a header
        t = read_delimited(
            path,
            ",",
            ["u", "i", "r", "t"],
            {"u": pa.string(), "i": pa.string(), "r": pa.float64(), "t": pa.float64()},
            skip_header=True,
        )
    else:  # u.data: user \t item \t rating \t ts
        t = read_delimited(
            path, "\t", ["u", "i", "r", "t"], {"u": pa.string(), "i": pa.string(), "r": pa.float64(), "t": pa.float64()}
        )
    return (t["u"].combine_chunks(), t["i"].combine_chunks(), t["r"].to_numpy(), t["t"].to_numpy())


def read_genres(path: Path) -> tuple[pa.Array, list[str], list[str]]:
    """-> item ids (strings), the first genre of each item (or NO_GENRE), titles."""
    path = Path(path)
    name = path.name
    if _is_recbole(path):
        t, fields = _recbole(path)
        col = "class" if "class" in fields else "genre"
        _need(path, t, "item_id", col)
        titles = t["movie_title"].to_pylist() if "movie_title" in fields else [""] * t.num_rows
        return t["item_id"].combine_chunks(), [(g.split() or [NO_GENRE])[0] for g in t[col].to_pylist()], titles
    if name.endswith(".dat") or name.endswith(".csv"):
        ids, first, titles = [], [], []
        sep = "::" if name.endswith(".dat") else ","
        import csv

        with open(path, encoding="latin-1" if name.endswith(".dat") else "utf8", newline="") as f:
            rows = (line.rstrip("\n").split("::") for line in f) if sep == "::" else csv.reader(f)
            for n, row in enumerate(rows, 1):
                if sep == "," and n == 1:
                    continue  # movieId,title,genres
                if len(row) != 3:
                    raise InputError(f"{path}:{n}: expected 3 fields (id, title, genres), got {len(row)}")
                ids.append(row[0])
                titles.append(row[1])
                g = row[2].split("|")[0]
                first.append(NO_GENRE if g in ("", "(no genres listed)") else g)
        return pa.array(ids, pa.string()), first, titles
    # u.item: id|title|release|video release|url|19 genre flags, latin-1
    ids, first, titles = [], [], []
    with open(path, encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            row = line.rstrip("\n").split("|")
            if len(row) != 5 + len(U_ITEM_GENRES):
                raise InputError(f"{path}:{n}: expected {5 + len(U_ITEM_GENRES)} fields, got {len(row)}")
            flags = row[5:]
            if any(x not in ("0", "1") for x in flags):
                raise InputError(f"{path}:{n}: genre flags must be 0 or 1")
            ids.append(row[0])
            titles.append(row[1])
            first.append(next((g for g, x in zip(U_ITEM_GENRES, flags, strict=True) if x == "1"), NO_GENRE))
    return pa.array(ids, pa.string()), first, titles


def read_users(path: Path) -> tuple[pa.Array, dict[str, pa.Array]]:
    """-> user ids, {profile column: values (strings)}."""
    path = Path(path)
    name = path.name
    if _is_recbole(path):
        t, _ = _recbole(path)
        _need(path, t, "user_id")
        return t["user_id"].combine_chunks(), {c: t[c].combine_chunks() for c in t.column_names if c != "user_id"}
    if name.endswith(".dat"):  # id::gender::age::occupation::zip
        names = ["user_id", "_1", "gender", "_2", "age", "_3", "occupation", "_4", "zip_code"]
        t = read_delimited(path, ":", names, {n: pa.string() for n in names})
    else:  # u.user: id|age|gender|occupation|zip
        names = ["user_id", "age", "gender", "occupation", "zip_code"]
        t = read_delimited(path, "|", names, {n: pa.string() for n in names})
    return t["user_id"].combine_chunks(), {
        c: t[c].combine_chunks() for c in t.column_names if c != "user_id" and not c.startswith("_")
    }


def age_groups(path: Path, ages: pa.Array) -> pa.Array:
    """Ages in years (or 1M's codes, unchanged) -> the 1M age group codes, as strings."""
    try:
        years = np.asarray(pc.cast(ages, pa.float64()).to_numpy(zero_copy_only=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad = next(a for a in ages.to_pylist() if not _is_number(a))
        raise InputError(f"{path}: age {bad!r} is not a number") from None
    codes = np.asarray(AGE_GROUPS)[np.maximum(np.searchsorted(AGE_GROUPS, years, side="right") - 1, 0)]
    return pa.array([str(c) for c in codes], pa.string())


def _is_number(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


CONTEXT = ("hour", "weekday")


# ---- conversion --------------------------------------------------------------------------------


def convert(
    inter: Path,
    item: Path,
    user: Path | None,
    out: Path,
    max_hist_len: int = 100,
    test_fraction: float = 0.278,
    seed: int = 0,
    progress: bool = True,
    valid_fraction: float = 0.0,
) -> dict:
    check_max_hist_len("movielens", max_hist_len)
    if not 0 < test_fraction < 1:
        raise InputError(f"convert movielens: --test-fraction must be in (0, 1), got {test_fraction}")
    if not 0 <= valid_fraction < 1:
        raise InputError(f"convert movielens: --valid-fraction must be in [0, 1), got {valid_fraction}")
    t0 = time.perf_counter()
    users_raw, items_raw, rating, ts = read_ratings(inter)
    if not np.isfinite(rating).all() or not np.isfinite(ts).all():
        raise InputError(f"{inter}: a rating or timestamp is not a finite number")
    item_ids, first_genre, titles = read_genres(item)
    user_row, user_dict = reindex(users_raw)
    # one id space for the ratings' items and the item file's (movies never rated keep rows too)
    rows, item_dict = reindex(pa.concat_arrays([items_raw, item_ids.cast(items_raw.type)]))
    item_row, item_file_row = rows[: len(items_raw)], rows[len(items_raw) :]
    genre_of_item = np.full(len(item_dict), -1, np.int64)
    genre_row, genre_dict = reindex(pa.array([*first_genre, NO_GENRE], pa.string()))
    genre_of_item[item_file_row] = genre_row[:-1]
    missing = genre_of_item < 0
    genre_of_item[missing] = genre_row[-1]
    profile: dict[str, np.ndarray] = {}
    profile_dicts: dict[str, pa.Array] = {}
    if user:
        uids, cols = read_users(user)
        if "age" in cols:
            cols["age"] = age_groups(user, cols["age"])
        if "zip_code" in cols:
            cols["zip_prefix"] = pc.utf8_slice_codeunits(cols["zip_code"], 0, 1)
        at = lookup(uids.cast(users_raw.type), user_dict)
        for c, values in cols.items():
            rows, d = reindex(values)
            per_user = np.full(len(user_dict), len(d), np.int64)  # users absent from the file: an extra row
            per_user[at[at >= 0]] = rows[at >= 0]
            profile[c], profile_dicts[c] = per_user, pa.concat_arrays([d, pa.array(["(unknown)"], d.type)])
    keys = [str(u) for u in user_dict.to_pylist()]
    is_test_user = test_users(keys, seed, test_fraction)
    is_valid_user = valid_users(keys, seed, valid_fraction, is_test_user)
    split_of_user = np.where(is_test_user, 2, np.where(is_valid_user, 1, 0)).astype(np.int8)
    order, offsets, positions = histories(user_row, ts, max_hist_len)
    label = (rating >= 4).astype(np.int8)[order]
    u, it, t = user_row[order], item_row[order], ts[order].astype(np.int64)
    cate = genre_of_item[it]
    splits = ("train", "valid", "test") if valid_fraction else ("train", "test")
    w = Writer(out, progress=progress, total=len(order), splits=splits)
    chunk = 1 << 20
    for a in range(0, len(order), chunk):
        b = min(a + chunk, len(order))
        off = offsets[a : b + 1] - offsets[a]
        pos = positions[offsets[a] : offsets[b]]
        extra = {**{c: v[u[a:b]] for c, v in profile.items()}, **time_columns(t[a:b], CONTEXT)}
        table = impressions_table(label[a:b], u[a:b], it[a:b], cate[a:b], off, it[pos], cate[pos], t[a:b], extra)
        split = split_of_user[u[a:b]]
        for code, name in enumerate(SPLITS):
            if name in splits:
                w.write(name, table.filter(pa.array(split == code)))
    write_vocab(out, "user_id", user_dict)
    title_of_item = [""] * len(item_dict)
    for row, title in zip(item_file_row, titles, strict=True):
        title_of_item[row] = title
    write_vocab(out, "item_id", item_dict, {"title": pa.array(title_of_item, pa.string())})
    write_vocab(out, "cate_id", genre_dict)
    for c, d in profile_dicts.items():
        write_vocab(out, c, d)
    return w.close(
        {
            "source": {"inter": str(inter), "item": str(item), "user": str(user) if user else None},
            "protocol": "DIN paper §6.1: rating >= 4 positive; first listed genre as category; history = earlier "
            "ratings in time order; users split by seeded hash",
            "num_rows": {
                "user_id": len(user_dict),
                "item_id": len(item_dict),
                "cate_id": len(genre_dict),
                **{c: len(d) for c, d in profile_dicts.items()},
                **{c: TIME_COLUMNS[c] for c in CONTEXT},
            },
            "profile": list(profile_dicts),
            "context": list(CONTEXT),
            "users": {name: int((split_of_user == code).sum()) for code, name in enumerate(SPLITS) if name in splits},
            "items_without_genre": int(missing.sum()),
            "max_hist_len": max_hist_len,
            "test_fraction": test_fraction,
            "valid_fraction": valid_fraction,
            "seed": seed,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )


def run(args: argparse.Namespace) -> dict:
    return convert(
        Path(args.inter),
        Path(args.item),
        Path(args.user) if args.user else None,
        Path(args.out),
        args.max_hist_len,
        args.test_fraction,
        args.seed,
        progress=not args.no_progress,
        valid_fraction=args.valid_fraction,
    )


def extract_recbole_ml100k(wheel: Path, out: Path) -> list[Path]:
    """Only MovieLens-100K's .inter/.item/.user files out of the recbole wheel (never installed)."""
    import zipfile

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(wheel) as z:
        for ext in ("inter", "item", "user"):
            name = f"recbole/dataset_example/ml-100k/ml-100k.{ext}"
            try:
                data = z.read(name)
            except KeyError:
                raise InputError(f"{wheel}: no {name} inside") from None
            (out / f"ml-100k.{ext}").write_bytes(data)
            written.append(out / f"ml-100k.{ext}")
    return written


if __name__ == "__main__":  # python -m tools.convert.movielens WHEEL DIR (used by `make reproduce-movielens`)
    import sys

    for p in extract_recbole_ml100k(Path(sys.argv[1]), Path(sys.argv[2])):
        print(p)

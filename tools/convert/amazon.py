"""Amazon product data (reviews + metadata) -> impressions, DIN paper §6.1 / DIEN paper §5:

- a user's reviews sorted by time (ties in file order) are the behaviours b_1 .. b_n;
- for k = 1 .. n−1, the review b_{k+1} is a positive (label 1) with history b_1 .. b_k (the most
  recent `--max-hist-len`), and one negative (label 0) with the same history and an item drawn
  uniformly from the reviewed items other than b_{k+1} (seeded);
- k = n−1 (each user's last review) goes to the test set, the others to training (the paper's
  split: "we predict the last one given the first n−1 reviewed goods");
- category: the last entry of the item's first category path in the metadata (`categories`, 2014
  files, as the DIN/DIEN preprocessing does) or the last entry of `category` (2018 files); items
  without metadata get "(no category)";
- context: `weekday` (0 Monday … 6 Sunday) and `month` (0 January … 11) of the review time
  of the impression's target review, UTC (the negative shares its positive's time).

Reviews: one JSON object per line with `reviewerID`, `asin`, `unixReviewTime`. Metadata: one
object per line with `asin` and `categories` or `category`, strict JSON or the Python-literal
lines of the 2014 dump (read with ast.literal_eval, never eval).
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tools.convert.common import (
    TIME_COLUMNS,
    InputError,
    Writer,
    add_output_arguments,
    check_max_hist_len,
    histories,
    impressions_table,
    reindex,
    time_columns,
    write_vocab,
)

NO_CATEGORY = "(no category)"

CONTEXT = ("weekday", "month")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "amazon",
        help="Amazon reviews + metadata JSON -> Parquet (DIN §6.1, DIEN §5)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--reviews", required=True, help="reviews JSON lines (e.g. reviews_Electronics_5.json)")
    p.add_argument("--meta", required=True, help="metadata lines (e.g. meta_Electronics.json)")
    p.add_argument("--seed", type=int, default=0, help="negative sampling seed (default: %(default)s)")
    add_output_arguments(p, max_hist_len=100)


def _lines(path: Path):
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with open(path, encoding="utf8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def _parse(path: Path, n: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        try:
            obj = ast.literal_eval(line.strip())  # the 2014 dumps: Python literals, single quotes
        except (ValueError, SyntaxError):
            raise InputError(f"{path}:{n}: neither JSON nor a Python literal: {line[:60]!r}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}:{n}: expected an object, got {type(obj).__name__}")
    return obj


def read_reviews(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    users, items, times = [], [], []
    for n, line in _lines(path):
        obj = _parse(path, n, line)
        for key in ("reviewerID", "asin", "unixReviewTime"):
            if key not in obj:
                raise InputError(f"{path}:{n}: no field {key!r}")
        t = obj["unixReviewTime"]
        if not isinstance(t, int | float) or isinstance(t, bool):
            raise InputError(f"{path}:{n}: field 'unixReviewTime': {t!r} is not a number")
        users.append(str(obj["reviewerID"]))
        items.append(str(obj["asin"]))
        times.append(t)
    return users, items, np.asarray(times, np.int64)


def read_categories(path: Path) -> dict[str, str]:
    out = {}
    for n, line in _lines(path):
        obj = _parse(path, n, line)
        if "asin" not in obj:
            raise InputError(f"{path}:{n}: no field 'asin'")
        cats = obj.get("categories")
        if cats is not None:  # 2014: a list of category paths
            if not (isinstance(cats, list) and all(isinstance(c, list) for c in cats)):
                raise InputError(f"{path}:{n}: field 'categories': expected a list of lists")
            leaf = cats[0][-1] if cats and cats[0] else None
        else:  # 2018: one path
            cat = obj.get("category") or []
            if not isinstance(cat, list):
                raise InputError(f"{path}:{n}: field 'category': expected a list")
            leaf = cat[-1] if cat else None
        out[str(obj["asin"])] = str(leaf) if leaf else NO_CATEGORY
    return out


def convert(
    reviews: Path, meta: Path, out: Path, max_hist_len: int = 100, seed: int = 0, progress: bool = True
) -> dict:
    check_max_hist_len("amazon", max_hist_len)
    t0 = time.perf_counter()
    users, items, times = read_reviews(Path(reviews))
    if not users:
        raise InputError(f"{reviews}: no reviews")
    categories = read_categories(Path(meta))
    user_row, user_dict = reindex(pa.array(users, pa.string()))
    item_row, item_dict = reindex(pa.array(items, pa.string()))
    asins = item_dict.to_pylist()
    cate_names = [categories.get(a, NO_CATEGORY) for a in asins]
    cate_of_item, cate_dict = reindex(pa.array(cate_names, pa.string()))
    order, offsets, positions = histories(user_row, times, max_hist_len)
    u, it, t = user_row[order], item_row[order], times[order]
    lengths = np.diff(offsets)
    last = np.r_[u[1:] != u[:-1], True]  # each user's last review
    target = lengths > 0  # b_1 is never a target: it has no history
    # negatives: uniform over the reviewed items, never the positive itself
    rng = np.random.default_rng([seed, 7])
    n_items = len(item_dict)
    if n_items < 2:
        raise InputError(f"{reviews}: one item only: no negatives can be drawn")
    neg = rng.integers(0, n_items - 1, it.size)
    neg += neg >= it  # skip the positive: uniform over the other n_items − 1
    w = Writer(out, progress=progress, total=2 * int(target.sum()))
    chunk = 1 << 19
    for a in range(0, len(order), chunk):
        b = min(a + chunk, len(order))
        sel = np.flatnonzero(target[a:b]) + a
        rows_off = np.zeros(sel.size + 1, np.int64)
        np.cumsum(lengths[sel], out=rows_off[1:])
        within = np.arange(rows_off[-1]) - np.repeat(rows_off[:-1], lengths[sel])
        pos = positions[np.repeat(offsets[sel], lengths[sel]) + within]
        for label, cand in ((1, it[sel]), (0, neg[sel])):
            table = impressions_table(
                np.full(sel.size, label),
                u[sel],
                cand,
                cate_of_item[cand],
                rows_off,
                it[pos],
                cate_of_item[it[pos]],
                t[sel],
                time_columns(t[sel], CONTEXT),
            )
            test = pa.array(last[sel])
            w.write("train", table.filter(pc.invert(test)))
            w.write("test", table.filter(test))
    write_vocab(out, "user_id", user_dict)
    write_vocab(out, "item_id", item_dict)
    write_vocab(out, "cate_id", cate_dict)
    return w.close(
        {
            "source": {"reviews": str(reviews), "meta": str(meta)},
            "protocol": "DIN paper §6.1: per user, each review after the first is a positive with the earlier "
            "reviews as history, plus one uniform negative; each user's last review is the test set",
            "num_rows": {
                "user_id": len(user_dict),
                "item_id": n_items,
                "cate_id": len(cate_dict),
                **{c: TIME_COLUMNS[c] for c in CONTEXT},
            },
            "context": list(CONTEXT),
            "reviews": len(users),
            "items_without_metadata": int(sum(a not in categories for a in asins)),
            "max_hist_len": max_hist_len,
            "seed": seed,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )


def run(args: argparse.Namespace) -> dict:
    return convert(
        Path(args.reviews), Path(args.meta), Path(args.out), args.max_hist_len, args.seed, progress=not args.no_progress
    )

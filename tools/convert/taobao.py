"""Taobao display-ad logs (the Alimama "Ad Display/Click Data on Taobao.com" CSVs, used in
taobao-din-application.md) -> impressions:

- raw_sample.csv (user, time_stamp, adgroup_id, pid, nonclk, clk): one impression per line,
  label = clk;
- ad_feature.csv (adgroup_id, cate_id, campaign_id, customer, brand, price): the ad's category
  and brand. The behaviour log names a category and a brand, not an ad, so the brand plays the
  item: item_id = the ad's brand, cate_id = its category, and every behaviour is a (brand,
  category) pair in the same tables. adgroup_id, campaign_id, customer and pid are extra columns;
- behavior_log.csv (user, time_stamp, btag, cate, brand): the history of an impression is the
  user's behaviours strictly before its time (btag in `--btags`), oldest first, the most recent
  `--max-hist-len`;
- user_profile.csv (userid, cms_segid, …; optional): profile columns, missing values a row of
  their own;
- context: `pid` (the ad position) and `hour`, the impression's hour of day (UTC);
- split by time: impressions at or after `--test-from` (default: the last 24 hours of
  raw_sample) are the test set.

"NULL" or empty ids are kept as their own row. All ids are re-indexed to contiguous rows. The
behaviour log is read in blocks (only the users of raw_sample and the chosen btags are kept, as
Arrow columns) and sorted in memory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from tools.convert.common import (
    TIME_COLUMNS,
    InputError,
    Writer,
    add_output_arguments,
    check_max_hist_len,
    impressions_table,
    read_delimited,
    reindex,
    time_columns,
    write_vocab,
)

RAW = ["user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk"]
AD = ["adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price"]
BEHAVIOUR = ["user", "time_stamp", "btag", "cate", "brand"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "taobao-ad",
        help="Taobao ad display/click CSVs -> Parquet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--raw-sample", required=True, help="raw_sample.csv")
    p.add_argument("--ad-feature", required=True, help="ad_feature.csv")
    p.add_argument("--behavior-log", required=True, help="behavior_log.csv")
    p.add_argument("--user-profile", help="user_profile.csv (optional)")
    p.add_argument("--btags", default="pv,cart,fav,buy", help="behaviour types kept (default: %(default)s)")
    p.add_argument("--test-from", type=int, help="first test time_stamp (default: the last 24 h of raw_sample)")
    add_output_arguments(p, max_hist_len=50)


def _header(path: Path, want: list[str]) -> None:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with open(path, encoding="utf8") as f:
        got = [h.strip() for h in f.readline().rstrip("\n").split(",")]
    if got != want:
        raise InputError(f"{path}:1: header {','.join(got)!r}, expected {','.join(want)!r}")


def _ids(values: pa.Array) -> pa.Array:
    """A string id column with "NULL", empty and null values as one missing marker."""
    values = pc.fill_null(pc.cast(values, pa.string()), "")
    return pc.if_else(pc.is_in(values, value_set=pa.array(["NULL", ""])), pa.scalar("(missing)"), values)


def read_behaviours(path: Path, users: pa.Array, btags: list[str]) -> dict[str, np.ndarray]:
    """The kept behaviours, in blocks: user, time, brand and category (strings as read)."""
    _header(path, BEHAVIOUR)
    read = pacsv.ReadOptions(column_names=BEHAVIOUR, skip_rows=1, block_size=1 << 26)
    convert = pacsv.ConvertOptions(
        column_types={
            "user": pa.string(),
            "time_stamp": pa.int64(),
            "btag": pa.string(),
            "cate": pa.string(),
            "brand": pa.string(),
        }
    )
    parts: dict[str, list] = {k: [] for k in ("user", "time", "brand", "cate")}
    try:
        reader = pacsv.open_csv(
            path, read_options=read, convert_options=convert, parse_options=pacsv.ParseOptions(quote_char=False)
        )
        for block in reader:
            keep = pc.and_(pc.is_in(block["user"], value_set=users), pc.is_in(block["btag"], value_set=pa.array(btags)))
            block = block.filter(keep)
            parts["user"].append(block["user"])
            parts["time"].append(block["time_stamp"])
            parts["brand"].append(_ids(block["brand"]))
            parts["cate"].append(_ids(block["cate"]))
    except pa.ArrowInvalid as e:
        # the streaming reader does not number lines; a full read of the file does
        read_delimited(path, ",", BEHAVIOUR, {"time_stamp": pa.int64()}, skip_header=True)
        raise InputError(f"{path}: {str(e).splitlines()[0]}") from None
    return {k: pa.chunked_array(v, pa.int64() if k == "time" else pa.string()) for k, v in parts.items()}


def convert(
    raw_sample: Path,
    ad_feature: Path,
    behavior_log: Path,
    user_profile: Path | None,
    out: Path,
    btags: list[str],
    max_hist_len: int = 50,
    test_from: int | None = None,
    progress: bool = True,
) -> dict:
    check_max_hist_len("taobao-ad", max_hist_len)
    bad = [b for b in btags if b not in ("pv", "cart", "fav", "buy")]
    if bad or not btags:
        raise InputError(
            f"convert taobao-ad: --btags: {bad[0] if bad else '(empty)'!r} is not one of pv, cart, fav, buy"
        )
    t0 = time.perf_counter()
    raw_sample, ad_feature, behavior_log = Path(raw_sample), Path(ad_feature), Path(behavior_log)
    _header(raw_sample, RAW)
    raw = read_delimited(
        raw_sample,
        ",",
        RAW,
        {
            "user": pa.string(),
            "time_stamp": pa.int64(),
            "adgroup_id": pa.string(),
            "pid": pa.string(),
            "nonclk": pa.int8(),
            "clk": pa.int8(),
        },
        skip_header=True,
    )
    clk = raw["clk"].to_numpy()
    if ((clk != 0) & (clk != 1)).any():
        line = int(np.flatnonzero((clk != 0) & (clk != 1))[0]) + 2
        raise InputError(f"{raw_sample}:{line}: column 'clk': {clk[line - 2]} is not 0 or 1")
    _header(ad_feature, AD)
    ads = read_delimited(ad_feature, ",", AD, {c: pa.string() for c in AD}, skip_header=True)
    # the ad of each impression
    at_arr = pc.index_in(raw["adgroup_id"], value_set=ads["adgroup_id"])
    if at_arr.null_count:
        missing = raw["adgroup_id"].filter(pc.is_null(at_arr))[0].as_py()
        raise InputError(f"{ad_feature}: adgroup_id {missing} of {raw_sample} is not in the file")
    at = at_arr.to_numpy(zero_copy_only=False).astype(np.int64)
    users = pc.unique(raw["user"].combine_chunks())
    beh = read_behaviours(behavior_log, users, btags)
    # one dictionary per shared id space: brands and categories of ads and behaviours together
    brand_row, brand_dict = reindex(
        pa.chunked_array([_ids(ads["brand"].combine_chunks()), *beh["brand"].chunks], pa.string())
    )
    cate_row, cate_dict = reindex(
        pa.chunked_array([_ids(ads["cate_id"].combine_chunks()), *beh["cate"].chunks], pa.string())
    )
    n_ads = ads.num_rows
    ad_brand, beh_brand = brand_row[:n_ads], brand_row[n_ads:]
    ad_cate, beh_cate = cate_row[:n_ads], cate_row[n_ads:]
    user_row, user_dict = reindex(pa.chunked_array([raw["user"].combine_chunks(), *beh["user"].chunks], pa.string()))
    n_raw = raw.num_rows
    imp_user, beh_user = user_row[:n_raw], user_row[n_raw:]
    imp_time = raw["time_stamp"].to_numpy()
    beh_time = beh["time"].to_numpy()
    # histories: behaviours of the same user strictly before the impression
    span = np.int64(1) << 32
    if beh_time.size and (beh_time.min() < 0 or beh_time.max() >= span) or imp_time.min() < 0 or imp_time.max() >= span:
        raise InputError(f"{raw_sample}: time_stamp outside [0, 2^32)")
    bkey = beh_user * span + beh_time
    border = np.argsort(bkey, kind="stable")
    bkey = bkey[border]
    end = np.searchsorted(bkey, imp_user * span + imp_time, side="left")
    begin = np.searchsorted(bkey, imp_user * span, side="left")
    lengths = np.minimum(end - begin, max_hist_len)
    test_from = int(imp_time.max()) - 86400 + 1 if test_from is None else test_from
    is_test = imp_time >= test_from
    extra_cols: dict[str, np.ndarray] = {}
    dicts: dict[str, pa.Array] = {}
    for c in ("adgroup_id", "campaign_id", "customer"):
        rows, dicts[c] = reindex(_ids(ads[c].combine_chunks()))
        extra_cols[c] = rows[at]
    extra_cols["pid"], dicts["pid"] = reindex(raw["pid"].combine_chunks())
    extra_cols.update(time_columns(imp_time, ("hour",)))
    profile_names: list[str] = []
    if user_profile:
        prof = read_delimited(Path(user_profile), ",", None, {}, skip_header=False)
        names = [c.strip() for c in prof.column_names]
        if "userid" not in names:
            raise InputError(f"{user_profile}:1: no column 'userid'")
        prof = prof.rename_columns(names)
        where = pc.index_in(raw["user"], value_set=pc.cast(prof["userid"], pa.string()))
        for c in names:
            if c == "userid":
                continue
            rows, d = reindex(_ids(pc.cast(prof[c], pa.string()).combine_chunks()))
            per = np.append(rows, len(d))  # users without a profile: an extra row
            idx = pc.fill_null(where, prof.num_rows).to_numpy(zero_copy_only=False).astype(np.int64)
            extra_cols[c], dicts[c] = per[idx], pa.concat_arrays([d, pa.array(["(no profile)"])])
            profile_names.append(c)
    w = Writer(out, progress=progress, total=n_raw)
    order = np.lexsort((imp_time, imp_user))  # rows in user and time order
    chunk = 1 << 20
    beh_brand_sorted, beh_cate_sorted = beh_brand[border], beh_cate[border]
    for a in range(0, n_raw, chunk):
        sel = order[a : a + chunk]
        offsets = np.zeros(sel.size + 1, np.int64)
        np.cumsum(lengths[sel], out=offsets[1:])
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths[sel])
        pos = np.repeat(end[sel] - lengths[sel], lengths[sel]) + within
        table = impressions_table(
            clk[sel],
            imp_user[sel],
            ad_brand[at[sel]],
            ad_cate[at[sel]],
            offsets,
            beh_brand_sorted[pos],
            beh_cate_sorted[pos],
            imp_time[sel],
            {k: v[sel] for k, v in extra_cols.items()},
        )
        test = pa.array(is_test[sel])
        w.write("train", table.filter(pc.invert(test)))
        w.write("test", table.filter(test))
    write_vocab(out, "user_id", user_dict)
    write_vocab(out, "item_id", brand_dict)
    write_vocab(out, "cate_id", cate_dict)
    for c, d in dicts.items():
        write_vocab(out, c, d)
    return w.close(
        {
            "source": {
                "raw_sample": str(raw_sample),
                "ad_feature": str(ad_feature),
                "behavior_log": str(behavior_log),
                "user_profile": str(user_profile) if user_profile else None,
            },
            "protocol": "label = clk; item = the ad's brand, cate = its category; history = the user's behaviours "
            "(brand, category) strictly before the impression; test = impressions from test_from on",
            "num_rows": {
                "user_id": len(user_dict),
                "item_id": len(brand_dict),
                "cate_id": len(cate_dict),
                **{c: len(d) for c, d in dicts.items()},
                "hour": TIME_COLUMNS["hour"],
            },
            "profile": profile_names,
            "context": ["pid", "hour"],
            "behaviours_kept": int(beh_time.size),
            "btags": btags,
            "test_from": test_from,
            "max_hist_len": max_hist_len,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )


def run(args: argparse.Namespace) -> dict:
    return convert(
        Path(args.raw_sample),
        Path(args.ad_feature),
        Path(args.behavior_log),
        Path(args.user_profile) if args.user_profile else None,
        Path(args.out),
        [b for b in args.btags.split(",") if b],
        args.max_hist_len,
        args.test_from,
        progress=not args.no_progress,
    )

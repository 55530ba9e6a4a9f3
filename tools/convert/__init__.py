"""`dinrec convert`: public click/rating logs -> the canonical Parquet schema (docs/design.md).

  movielens   RecBole atomic files (.inter/.item/.user) or GroupLens u.data/u.item/u.user,
              ratings.dat/movies.dat/users.dat (DIN paper §6.1 protocol)
  amazon      Amazon product data: reviews JSON + metadata JSON (DIN paper §6.1, DIEN §5)
  taobao-ad   Taobao display-ad logs: raw_sample, ad_feature, user_profile, behavior_log CSVs

Each writes DIR/train/part-*.parquet, DIR/test/part-*.parquet, DIR/vocab/*.parquet (original id
-> row id of every re-indexed column) and DIR/convert.json (row counts, click rate, vocabulary
sizes for the config's `num_rows`). A malformed input line stops the run with one line naming
file:line.
"""

from __future__ import annotations

import argparse

from tools.convert import amazon, movielens, taobao


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="public data sets -> the canonical Parquet schema")
    csub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    movielens.add_parser(csub)
    amazon.add_parser(csub)
    taobao.add_parser(csub)


def run(args: argparse.Namespace) -> dict:
    return {"movielens": movielens, "amazon": amazon, "taobao-ad": taobao}[args.dataset].run(args)

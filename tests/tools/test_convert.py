"""Converters on tiny files written here, against rows built by a plain Python loop from the same
records; every input format of a data set gives the same Parquet; malformed input is one line
naming file:line."""

import datetime
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from launch.cli import main
from tools.convert.common import InputError

# (user, item, rating, ts); ties in time on purpose (u1 at 100, u2 at 300)
RATINGS = [
    ("u1", "m1", 5, 100),
    ("u1", "m2", 3, 100),
    ("u2", "m3", 4, 300),
    ("u1", "m3", 1, 50),
    ("u2", "m1", 2, 300),
    ("u3", "m2", 4, 10),
    ("u1", "m4", 4, 200),
    ("u2", "m2", 5, 100),
    ("u3", "m1", 1, 20),
    ("u3", "m4", 5, 30),
    ("u1", "m1", 2, 300),
    ("u2", "m4", 3, 400),
]
# m3: no genre; lists in u.item's flag order, so that every format names the same first genre
GENRES = {"m1": ["Comedy", "Drama"], "m2": ["Action"], "m3": [], "m4": ["Action", "Drama"]}
PROFILE = {"u1": ("24", "M", "writer"), "u2": ("53", "F", "other"), "u3": ("24", "F", "writer")}
U_ITEM = [
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


def expected_movielens(max_hist: int) -> dict[tuple, tuple]:
    """(original user, ts, item) -> (label, first genre, [history items oldest first])."""
    out = {}
    by_user: dict[str, list] = {}
    for pos, (u, i, r, t) in enumerate(RATINGS):
        by_user.setdefault(u, []).append((t, pos, i, r))
    for u, rows in by_user.items():
        rows.sort()  # time, then file position
        for k, (t, _, i, r) in enumerate(rows):
            hist = [x[2] for x in rows[:k]][-max_hist:]
            out[(u, t, i)] = (int(r >= 4), (GENRES[i] or ["(no genre)"])[0], hist)
    return out


def write_recbole(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    (d / "x.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS)
    )
    (d / "x.item").write_text(
        "item_id:token\tmovie_title:token_seq\tclass:token_seq\n"
        + "".join(f"{i}\tTitle {i}\t{' '.join(g)}\n" for i, g in GENRES.items())
    )
    (d / "x.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join(f"{u}\t{a}\t{g}\t{o}\t00000\n" for u, (a, g, o) in PROFILE.items())
    )
    return {"inter": d / "x.inter", "item": d / "x.item", "user": d / "x.user"}


def write_grouplens_100k(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    lines = []
    for i, g in GENRES.items():
        flags = ["1" if name in g else "0" for name in U_ITEM]
        lines.append("|".join([i, f"Title {i}", "01-Jan-1995", "", "http://x", *flags]))
    (d / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    (d / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|00000\n" for u, (a, g, o) in PROFILE.items()))
    return {"inter": d / "u.data", "item": d / "u.item", "user": d / "u.user"}


def write_grouplens_1m(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    (d / "movies.dat").write_text(
        "".join(f"{i}::Title: {i} (1995)::{'|'.join(g) or '(no genres listed)'}\n" for i, g in GENRES.items()),
        encoding="latin-1",
    )
    (d / "users.dat").write_text("".join(f"{u}::{g}::{a}::{o}::00000\n" for u, (a, g, o) in PROFILE.items()))
    return {"inter": d / "ratings.dat", "item": d / "movies.dat", "user": d / "users.dat"}


def rows_of(out: Path) -> dict[tuple, tuple]:
    """(original user, ts, original item) -> (label, genre, [history items]) from the Parquet + vocab."""
    vocab = {
        name: pq.read_table(out / "vocab" / f"{name}.parquet").column("id").to_pylist()
        for name in ("user_id", "item_id", "cate_id")
    }
    got = {}
    for split in ("train", "test"):
        t = pq.read_table(sorted((out / split).glob("*.parquet"))).to_pylist()
        for r in t:
            key = (vocab["user_id"][r["user_id"]], r["ts"], vocab["item_id"][r["item_id"]])
            assert key not in got
            got[key] = (r["label"], vocab["cate_id"][r["cate_id"]], [vocab["item_id"][i] for i in r["hist_item_id"]])
            assert [vocab["cate_id"][c] for c in r["hist_cate_id"]] == [
                (GENRES[i] or ["(no genre)"])[0] for i in got[key][2]
            ]
    return got


def convert_ml(files: dict, out: Path, *extra) -> dict:
    args = [
        "convert",
        "movielens",
        "--inter",
        str(files["inter"]),
        "--item",
        str(files["item"]),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]
    if "user" in files:
        args += ["--user", str(files["user"])]
    assert main(args) == 0
    return json.loads((out / "convert.json").read_text())


@pytest.mark.parametrize("max_hist", [100, 2])
def test_movielens_recbole_rows_equal_a_python_loop(tmp_path, max_hist):
    summary = convert_ml(write_recbole(tmp_path / "in"), tmp_path / "out", "--max-hist-len", str(max_hist))
    assert rows_of(tmp_path / "out") == expected_movielens(max_hist)
    assert summary["num_rows"]["item_id"] == 4 and summary["num_rows"]["user_id"] == 3
    assert summary["rows"]["train"] + summary["rows"]["test"] == len(RATINGS)


def test_movielens_every_format_gives_the_same_parquet(tmp_path):
    outs = []
    for name, write in (("recbole", write_recbole), ("100k", write_grouplens_100k), ("1m", write_grouplens_1m)):
        convert_ml(write(tmp_path / name), tmp_path / f"out_{name}")
        outs.append(
            [
                pq.read_table(tmp_path / f"out_{name}" / split / "part-000.parquet").to_pylist()
                for split in ("train", "test")
            ]
        )
    assert outs[0] == outs[1] == outs[2] and sum(map(len, outs[0])) == len(RATINGS)


def test_movielens_split_is_by_user_and_profiles_are_attached(tmp_path):
    out = tmp_path / "out"
    convert_ml(write_recbole(tmp_path / "in"), out, "--test-fraction", "0.5", "--seed", "3")
    splits = {s: pq.read_table(sorted((out / s).glob("*.parquet"))).to_pylist() for s in ("train", "test")}
    users = {s: {r["user_id"] for r in rows} for s, rows in splits.items()}
    assert users["train"].isdisjoint(users["test"]) and users["train"] | users["test"] == {0, 1, 2}
    vocab = {
        n: pq.read_table(out / "vocab" / f"{n}.parquet").column("id").to_pylist()
        for n in ("user_id", "age", "gender", "occupation", "zip_prefix")
    }
    groups = {"24": "18", "53": "50"}  # years -> the 1M file's age groups (18–24, 50–55)
    for r in splits["train"] + splits["test"]:
        age, gender, occupation = PROFILE[vocab["user_id"][r["user_id"]]]
        got = (vocab["age"][r["age"]], vocab["gender"][r["gender"]], vocab["occupation"][r["occupation"]])
        assert got == (groups[age], gender, occupation)
        # context: the rating's hour and weekday in UTC, by the standard library
        when = datetime.datetime.fromtimestamp(r["ts"], datetime.UTC)
        assert (r["hour"], r["weekday"]) == (when.hour, when.weekday())
        assert vocab["zip_prefix"][r["zip_prefix"]] == "0"


def test_movielens_valid_split_is_carved_from_the_training_users(tmp_path):
    """--valid-fraction moves a seeded-hash share of the training users, whole, into valid/; the
    test set is the one without it; a later conversion without it leaves no stale valid/."""
    import zlib

    users = [f"u{k}" for k in range(60)]
    d = tmp_path / "in"
    d.mkdir()
    (d / "x.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(
            f"{u}\tm{(k * 7 + j) % 4 + 1}\t{(k + j) % 5 + 1}\t{10 * j}\n" for k, u in enumerate(users) for j in range(3)
        )
    )
    files = write_recbole(tmp_path / "meta")
    files["inter"] = d / "x.inter"
    del files["user"]

    def read(out, split):
        vocab = pq.read_table(out / "vocab" / "user_id.parquet").column("id").to_pylist()
        rows = pq.read_table(sorted((out / split).glob("*.parquet"))).to_pylist() if (out / split).is_dir() else []
        return sorted((vocab[r["user_id"]], r["ts"], r["item_id"], r["label"], tuple(r["hist_item_id"])) for r in rows)

    split = ["--test-fraction", "0.2", "--seed", "5"]
    convert_ml(files, tmp_path / "plain", *split)
    summary = convert_ml(files, tmp_path / "valid", *split, "--valid-fraction", "0.3")

    def share(key: str) -> int:
        return zlib.crc32(key.encode()) % 1_000_000

    want = {u for u in users if share(f"5/valid/{u}") < 300_000 and not share(f"5/{u}") < 200_000}
    got = read(tmp_path / "valid", "valid")
    assert {r[0] for r in got} == want and 5 <= len(want) <= 25
    assert summary["users"]["valid"] == len(want) and summary["rows"]["valid"] == 3 * len(want)
    assert read(tmp_path / "valid", "test") == read(tmp_path / "plain", "test")
    assert sorted(read(tmp_path / "valid", "train") + got) == read(tmp_path / "plain", "train")
    convert_ml(files, tmp_path / "valid", *split)
    assert read(tmp_path / "valid", "valid") == []


def test_context_columns_against_the_standard_library():
    from tools.convert.common import time_columns
    from tools.convert.movielens import age_groups

    ts = np.random.default_rng(0).integers(0, 2_000_000_000, 500)
    got = time_columns(ts, ("hour", "weekday", "month"))
    want = [datetime.datetime.fromtimestamp(int(t), datetime.UTC) for t in ts]
    assert got["hour"].tolist() == [w.hour for w in want]
    assert got["weekday"].tolist() == [w.weekday() for w in want]
    assert got["month"].tolist() == [w.month - 1 for w in want]
    import pyarrow as pa

    years = pa.array(["7", "17", "18", "24", "25", "44", "45", "49", "50", "55", "56", "73"])
    assert age_groups(Path("u.user"), years).to_pylist() == "1 1 18 18 25 35 45 45 50 50 56 56".split()
    codes = pa.array(["1", "18", "25", "35", "45", "50", "56"])  # MovieLens-1M's codes stay as they are
    assert age_groups(Path("users.dat"), codes).to_pylist() == codes.to_pylist()
    with pytest.raises(InputError, match="u.user: age 'old' is not a number"):
        age_groups(Path("u.user"), pa.array(["24", "old"]))


def test_movielens_output_reads_as_training_data(tmp_path):
    from trainer.config import load_config
    from trainer.data import stream_from_config

    out = tmp_path / "out"
    s = convert_ml(write_recbole(tmp_path / "in"), out)
    cfg = load_config(
        str(Path(__file__).resolve().parents[2] / "configs/movielens_din.yaml"),
        [
            f"data.train={out / 'train'}",
            f"data.test={out / 'test'}",
            f"tables.0.num_rows={s['num_rows']['item_id']}",
            f"tables.1.num_rows={s['num_rows']['cate_id']}",
        ],
    )
    n = sum(len(b) for split in ("train", "test") for b in stream_from_config(cfg, split).epoch(0))
    assert n == len(RATINGS)


@pytest.mark.parametrize(
    ("fmt", "corrupt", "where"),
    [
        ("100k", lambda d: (d / "u.data").write_text("u1\tm1\t5\t100\nu1\tm2\t3\n"), "u.data:2"),
        ("100k", lambda d: (d / "u.data").write_text("u1\tm1\t5\t100\nu1\tm2\tfive\t100\n"), "u.data"),
        ("recbole", lambda d: (d / "x.inter").write_text("user_id\titem_id:token\n"), "x.inter:1"),
        ("1m", lambda d: (d / "movies.dat").write_text("m1::Title::Comedy\nm2::Title\n"), "movies.dat:2"),
    ],
)
def test_movielens_malformed_input_is_one_line_with_file_and_line(tmp_path, capsys, fmt, corrupt, where):
    write = {"recbole": write_recbole, "100k": write_grouplens_100k, "1m": write_grouplens_1m}[fmt]
    files = write(tmp_path / "in")
    corrupt(tmp_path / "in")
    args = [
        "convert",
        "movielens",
        "--inter",
        str(files["inter"]),
        "--item",
        str(files["item"]),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and where in err, err
    if fmt == "100k" and "five" in (tmp_path / "in" / "u.data").read_text():
        assert ":2" in err and "five" in err


# ---- Amazon

REVIEWS = [
    ("A", "i1", 10),
    ("A", "i2", 20),
    ("B", "i2", 5),
    ("A", "i3", 30),
    ("B", "i4", 5),
    ("C", "i1", 1),
    ("B", "i1", 7),
    ("A", "i4", 40),
]
META_2014 = {
    "i1": [["Electronics", "Audio", "Headphones"]],
    "i2": [["Electronics", "Cameras"], ["Gifts"]],
    "i3": [["Electronics", "Audio"]],
}  # i4: no metadata


def test_amazon_rows_equal_a_python_loop(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "reviews.json").write_text(
        "".join(
            json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0}) + "\n" for u, i, t in REVIEWS
        )
    )
    (d / "meta.json").write_text(
        "".join(repr({"asin": a, "categories": c, "title": "x"}) + "\n" for a, c in META_2014.items())
    )  # the 2014 Python-literal lines
    out = tmp_path / "out"
    assert (
        main(
            [
                "convert",
                "amazon",
                "--reviews",
                str(d / "reviews.json"),
                "--meta",
                str(d / "meta.json"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    vocab = {
        n: pq.read_table(out / "vocab" / f"{n}.parquet").column("id").to_pylist()
        for n in ("user_id", "item_id", "cate_id")
    }
    leaf = {a: c[0][-1] for a, c in META_2014.items()}
    want = {}
    by_user: dict[str, list] = {}
    for pos, (u, i, t) in enumerate(REVIEWS):
        by_user.setdefault(u, []).append((t, pos, i))
    for u, rows in by_user.items():
        rows.sort()
        for k in range(1, len(rows)):
            want[(u, rows[k][0])] = ("test" if k == len(rows) - 1 else "train", rows[k][2], [x[2] for x in rows[:k]])
    got_pos, got_neg = {}, {}
    for split in ("train", "test"):
        for r in pq.read_table(sorted((out / split).glob("*.parquet"))).to_pylist():
            key = (vocab["user_id"][r["user_id"]], r["ts"])
            item = vocab["item_id"][r["item_id"]]
            assert vocab["cate_id"][r["cate_id"]] == leaf.get(item, "(no category)")
            when = datetime.datetime.fromtimestamp(r["ts"], datetime.UTC)  # context: the review's time
            assert (r["weekday"], r["month"]) == (when.weekday(), when.month - 1)
            rec = (split, item, [vocab["item_id"][i] for i in r["hist_item_id"]])
            (got_pos if r["label"] == 1 else got_neg)[key] = rec
    assert got_pos == want
    assert got_neg.keys() == want.keys()
    for key, (split, item, hist) in got_neg.items():
        assert split == want[key][0] and hist == want[key][2] and item != want[key][1]


def test_amazon_malformed_line_names_file_and_line(tmp_path, capsys):
    (tmp_path / "r.json").write_text(
        '{"reviewerID": "A", "asin": "i1", "unixReviewTime": 1}\n{"reviewerID": "A", "asin"\n'
    )
    (tmp_path / "m.json").write_text("")
    assert (
        main(
            [
                "convert",
                "amazon",
                "--reviews",
                str(tmp_path / "r.json"),
                "--meta",
                str(tmp_path / "m.json"),
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "r.json:2" in err


# ---- Taobao


def write_taobao(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    (d / "raw_sample.csv").write_text(
        "user,time_stamp,adgroup_id,pid,nonclk,clk\n"
        "1,1000,a1,p1,1,0\n1,100000,a2,p2,0,1\n2,500,a1,p1,0,1\n2,99000,a3,p1,1,0\n"
    )
    (d / "ad_feature.csv").write_text(
        "adgroup_id,cate_id,campaign_id,customer,brand,price\n"
        "a1,c1,k1,s1,b1,10.0\na2,c2,k1,s1,NULL,5.0\na3,c1,k2,s2,b3,1.0\n"
    )
    (d / "behavior_log.csv").write_text(
        "user,time_stamp,btag,cate,brand\n"
        "1,10,pv,c1,b1\n1,900,cart,c2,b2\n1,1000,pv,c9,b9\n1,5000,buy,c1,b3\n"
        "2,400,fav,c2,b2\n3,1,pv,c1,b1\n2,98000,pv,c3,b4\n"
    )
    (d / "user_profile.csv").write_text("userid,cms_segid,age_level,new_user_class_level \n1,0,3,2\n2,5,,1\n")
    return d


def test_taobao_histories_are_strictly_earlier_behaviours(tmp_path):
    d = write_taobao(tmp_path / "in")
    out = tmp_path / "out"
    assert (
        main(
            [
                "convert",
                "taobao-ad",
                "--raw-sample",
                str(d / "raw_sample.csv"),
                "--ad-feature",
                str(d / "ad_feature.csv"),
                "--behavior-log",
                str(d / "behavior_log.csv"),
                "--user-profile",
                str(d / "user_profile.csv"),
                "--btags",
                "pv,cart,buy",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    vocab = {
        n: pq.read_table(out / "vocab" / f"{n}.parquet").column("id").to_pylist()
        for n in ("user_id", "item_id", "cate_id", "adgroup_id", "age_level")
    }
    rows = {}
    for split in ("train", "test"):
        for r in pq.read_table(sorted((out / split).glob("*.parquet"))).to_pylist():
            assert r["hour"] == datetime.datetime.fromtimestamp(r["ts"], datetime.UTC).hour  # context
            rows[(vocab["user_id"][r["user_id"]], r["ts"])] = (
                split,
                r["label"],
                vocab["item_id"][r["item_id"]],
                vocab["cate_id"][r["cate_id"]],
                [vocab["item_id"][i] for i in r["hist_item_id"]],
                [vocab["cate_id"][c] for c in r["hist_cate_id"]],
                vocab["adgroup_id"][r["adgroup_id"]],
                vocab["age_level"][r["age_level"]],
            )
    # the last 24 h of raw_sample (from 100000 − 86400 + 1 = 13601) are the test set; fav is not kept
    assert rows == {
        ("1", 1000): ("train", 0, "b1", "c1", ["b1", "b2"], ["c1", "c2"], "a1", "3"),  # the pv at 1000 is not before
        ("1", 100000): ("test", 1, "(missing)", "c2", ["b1", "b2", "b9", "b3"], ["c1", "c2", "c9", "c1"], "a2", "3"),
        ("2", 500): ("train", 1, "b1", "c1", [], [], "a1", "(missing)"),
        ("2", 99000): ("test", 0, "b3", "c1", ["b4"], ["c3"], "a3", "(missing)"),
    }


def test_taobao_bad_label_and_header_are_one_line(tmp_path, capsys):
    d = write_taobao(tmp_path / "in")
    base = [
        "convert",
        "taobao-ad",
        "--raw-sample",
        str(d / "raw_sample.csv"),
        "--ad-feature",
        str(d / "ad_feature.csv"),
        "--behavior-log",
        str(d / "behavior_log.csv"),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    (d / "raw_sample.csv").write_text("user,time_stamp,adgroup_id,pid,nonclk,clk\n1,1000,a1,p1,1,0\n1,5,a1,p1,0,2\n")
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert "raw_sample.csv:3" in err and "clk" in err and len(err.splitlines()) == 1
    (d / "ad_feature.csv").write_text("adgroup,cate_id\n")
    write_taobao(d)  # restore the others
    (d / "ad_feature.csv").write_text("adgroup,cate_id\n")
    assert main(base) == 2
    assert "ad_feature.csv:1" in capsys.readouterr().err


def test_converter_errors_are_input_errors():
    assert issubclass(InputError, ValueError)


def test_experiment_movielens_trains_three_models_and_writes_table_and_plot(tmp_path, capsys):
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    d.mkdir()
    users, items = 80, 30
    lines = [f"u{u}\tm{rng.integers(items)}\t{rng.integers(1, 6)}\t{t}\n" for u in range(users) for t in range(15)]
    (d / "x.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(lines))
    (d / "x.item").write_text(
        "item_id:token\tclass:token_seq\n"
        + "".join(f"m{i}\t{['Action', 'Drama', 'Comedy'][i % 3]}\n" for i in range(items))
    )
    convert_ml({"inter": d / "x.inter", "item": d / "x.item"}, tmp_path / "ml")
    capsys.readouterr()
    md, png = tmp_path / "r.md", tmp_path / "g.png"
    assert (
        main(
            [
                "experiment",
                "movielens",
                "--data",
                str(tmp_path / "ml"),
                "--seeds",
                "0",
                "--out",
                str(md),
                "--plot",
                str(png),
                "--runs",
                str(tmp_path / "runs"),
                "train.epochs=2",
                "data.batch_size=64",
                "tables.0.dim=4",
                "tables.1.dim=4",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(r["summary"]) == {"base", "din", "din_dice"}
    assert all(len(run["curve"]) == 2 for runs in r["runs"].values() for run in runs)
    base, din = r["summary"]["base"]["epochs"][0], r["summary"]["din"]["epochs"][0]
    assert din["rela_impr_gauc"] == pytest.approx(((din["gauc"][0] - 0.5) / (base["gauc"][0] - 0.5) - 1) * 100)
    assert len(r["summary"]["din"]["epochs"]) == 2
    assert "| DIN with Dice |" in md.read_text() and png.read_bytes()[:4] == b"\x89PNG"

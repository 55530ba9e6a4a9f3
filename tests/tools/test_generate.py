"""The synthetic generator: schema, determinism, and p_click recomputed row by row from the world."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import TINY
from tools.generate import World, WorldSpec, generate


def read(d, split):
    return pq.read_table(sorted((d / split).glob("*.parquet")))


def test_schema_files_and_row_groups(tiny_data):
    t = read(tiny_data, "train")
    s = t.schema
    assert s.field("label").type == pa.int8()
    for c in ("user_id", "item_id", "cate_id", "ts"):
        assert s.field(c).type == pa.int64()
    for c in ("hist_item_id", "hist_cate_id"):
        assert s.field(c).type == pa.list_(pa.int64())
    assert s.field("p_click").type == pa.float32()
    files = sorted((tiny_data / "train").glob("*.parquet"))
    assert len(files) == 3 and sum(pq.ParquetFile(f).num_row_groups for f in files) >= 6
    n_users, n_imp, n_test = TINY["users"], TINY["impressions_per_user"], TINY["test_per_user"]
    assert t.num_rows == n_users * (n_imp - n_test)
    assert read(tiny_data, "test").num_rows == n_users * n_test
    assert set(np.unique(t["label"].to_numpy())) <= {0, 1}


def test_train_is_before_test_for_every_user(tiny_data):
    tr, te = read(tiny_data, "train"), read(tiny_data, "test")
    last_train = {}
    for u, ts in zip(tr["user_id"].to_pylist(), tr["ts"].to_pylist(), strict=True):
        last_train[u] = max(ts, last_train.get(u, -1))
    for u, ts in zip(te["user_id"].to_pylist(), te["ts"].to_pylist(), strict=True):
        assert ts > last_train[u]


def test_deterministic_by_seed(tmp_path):
    spec = WorldSpec(**{**TINY, "users": 50})
    for d in ("a", "b"):
        generate(spec, tmp_path / d, train_files=2, test_files=1, row_group_size=64, progress=False)
    generate(
        WorldSpec(**{**TINY, "users": 50, "seed": 4}),
        tmp_path / "c",
        train_files=2,
        test_files=1,
        row_group_size=64,
        progress=False,
    )
    assert read(tmp_path / "a", "train").equals(read(tmp_path / "b", "train"))
    assert not read(tmp_path / "a", "train").equals(read(tmp_path / "c", "train"))


def test_p_click_follows_the_documented_click_model(tiny_data):
    """p_click of the written rows, recomputed row by row from the world's items and the user's
    interests at the impression (the generator's state, matched by user and time)."""
    spec = WorldSpec(**TINY)
    w = World(spec)
    state = w.users(0, spec.users)
    interests = {
        (u, ts): set(i.tolist()) for u, ts, i in zip(state["user_id"], state["ts"], state["interests"], strict=True)
    }
    t = read(tiny_data, "test").slice(0, 200).to_pylist()
    assert any(row["cate_id"] in interests[row["user_id"], row["ts"]] for row in t)
    assert not all(row["cate_id"] in interests[row["user_id"], row["ts"]] for row in t)
    for row in t:
        a = row["item_id"]
        assert row["cate_id"] == w.item_cate[a]
        assert row["hist_cate_id"] == [int(w.item_cate[h]) for h in row["hist_item_id"]]
        T = len(row["hist_item_id"])
        assert 0 < T <= spec.hist_max
        soft = sum(
            spec.recency ** (T - 1 - t) * math.exp(spec.beta * (float(w.item_vec[a] @ w.item_vec[h]) - 1))
            for t, h in enumerate(row["hist_item_id"])
        )
        logit = spec.bias + w.item_quality[a] + spec.gamma * math.log1p(soft)
        logit += spec.current * (row["cate_id"] in interests[row["user_id"], row["ts"]])
        assert abs(row["p_click"] - 1 / (1 + math.exp(-logit))) < 1e-5


def test_current_interest_term_adds_exactly_current_to_the_logit_of_some_rows():
    """`current` adds `current` to the logit of the rows whose candidate is of one of the user's
    interests at the impression, and changes nothing else: the same world with current=0 and 1.5
    differs in the logit by 0 or 1.5 only; at least the half of candidates drawn from the current
    interests gets it; the histories are the same."""
    base, cur = (World(WorldSpec(**{**TINY, "current": c, "from_history": 0.0})).users(0, 100) for c in (0.0, 1.5))
    assert np.array_equal(base["hist_item_id"], cur["hist_item_id"]) and np.array_equal(base["item_id"], cur["item_id"])

    def logit(p):
        p = p.astype(np.float64)
        return np.log(p / (1 - p))

    diff = logit(cur["p_click"]) - logit(base["p_click"])
    on = np.abs(diff - 1.5) < 1e-3
    assert np.all(on | (np.abs(diff) < 1e-3))
    assert 0.5 <= on.mean() < 0.9


def test_summary_reports_oracle_auc_and_speed(tiny_data):
    import json

    s = json.loads((tiny_data / "generate.json").read_text())
    assert 0.5 < s["oracle_auc"]["test"] < 1 and s["rows_per_minute"] > 0


def test_from_history_draws_candidates_of_a_category_in_the_history():
    """`from_history` re-draws that share of the candidates as items of the category of one behaviour
    of their own history (retargeting); the histories stay the same. With 1, every candidate's
    category is in its history; with 0.5, about half the candidates change."""

    def in_history(rows):  # per row: is the candidate's category among its history's categories?
        off = rows["hist_offsets"]
        return np.array(
            [rows["cate_id"][i] in set(rows["hist_cate_id"][off[i] : off[i + 1]].tolist()) for i in range(len(off) - 1)]
        )

    base, again = (World(WorldSpec(**{**TINY, "from_history": f})).users(0, 200) for f in (0.0, 1.0))
    assert np.array_equal(base["hist_item_id"], again["hist_item_id"])
    assert in_history(again).all()
    assert in_history(base).mean() < 0.95  # without the option, popular candidates often come from elsewhere
    half = World(WorldSpec(**{**TINY, "from_history": 0.5})).users(0, 200)
    changed = np.mean(half["item_id"] != base["item_id"])
    assert 0.3 < changed < 0.6  # about half re-drawn (a re-draw can hit the same item)


def test_profile_and_context_affinities_add_exactly_their_terms():
    """--profile/--context add profile·Σ_f A_f[v_f, category]/√3 and context·Σ_f A_f[v_f,
    category]/√2 to the logit, recomputed from the world's planted affinities and the written
    values; histories, candidates and every other column's draws stay those of the default world."""
    from tools.generate import CONTEXT_FIELDS, PROFILE_FIELDS

    base = World(WorldSpec(**TINY)).users(0, 100)
    w = World(WorldSpec(**TINY, profile=0.8, context=1.3))
    both = w.users(0, 100)
    assert np.array_equal(base["hist_item_id"], both["hist_item_id"])
    assert np.array_equal(base["item_id"], both["item_id"])
    assert not any(f in base for f in (*PROFILE_FIELDS, *CONTEXT_FIELDS))

    def logit(p):
        p = p.astype(np.float64)
        return np.log(p / (1 - p))

    cate = both["cate_id"]
    want = sum(w.affinity[f][both[f], cate] for f in PROFILE_FIELDS) * 0.8 / math.sqrt(3)
    want += sum(w.affinity[f][both[f], cate] for f in CONTEXT_FIELDS) * 1.3 / math.sqrt(2)
    np.testing.assert_allclose(logit(both["p_click"]) - logit(base["p_click"]), want, atol=2e-3)
    for f, card in {**PROFILE_FIELDS, **CONTEXT_FIELDS}.items():
        assert both[f].min() >= 0 and both[f].max() < card
    per_user = {}  # a profile belongs to the user, the context to the impression
    for u, g, h in zip(both["user_id"], both["gender"], both["hour"], strict=True):
        per_user.setdefault(u, (set(), set()))[0].add(g)
        per_user[u][1].add(h)
    assert all(len(g) == 1 for g, _ in per_user.values()) and any(len(h) > 1 for _, h in per_user.values())


def test_validation_users_are_new_users_of_the_same_world(tmp_path):
    spec = WorldSpec(**{**TINY, "users": 50})
    generate(spec, tmp_path / "a", train_files=2, test_files=1, row_group_size=64, progress=False)
    s = generate(
        WorldSpec(**{**TINY, "users": 50, "valid_users": 20}),
        tmp_path / "b",
        train_files=2,
        test_files=1,
        row_group_size=64,
        progress=False,
    )
    for split in ("train", "test"):  # the same training and test rows as without validation users
        assert read(tmp_path / "a", split).equals(read(tmp_path / "b", split))
    valid = read(tmp_path / "b", "valid")
    assert valid.num_rows == 20 * TINY["test_per_user"] == s["rows"]["valid"]
    assert set(valid["user_id"].to_pylist()) == set(range(50, 70))
    assert 0.5 < s["oracle_auc"]["valid"] < 1
    generate(spec, tmp_path / "b", train_files=2, test_files=1, row_group_size=64, progress=False)
    assert not (tmp_path / "b" / "valid").exists()  # regenerated without: no stale validation set

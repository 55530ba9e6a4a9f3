"""Synthetic click logs with structure that only a behaviour-attention model can exploit.

World:
- `cates` categories with unit centroids u_c in R^k; each item i belongs to one category and has
  a latent vector v_i = normalize(u_c(i) + sigma * noise), so items of one category are similar;
  item quality q_i ~ N(0, quality_std^2); popularity is Zipf within a category.
- every user keeps `interests` latent categories; at each behaviour step one of them is replaced
  by a random category with probability `drift` (interests drift over time). A behaviour is an
  item of one of the current interests (probability 1 - explore) or of a random category.
- an impression at step t shows a candidate drawn from the user's *current* interests (half of the
  time) or from global popularity, with history = the last `hist_max` behaviours before t; then a
  share `from_history` of the candidates is re-drawn from the category of one behaviour of the
  history, picked uniformly (retargeting: current and past interests alike).

Click probability (its logit), for candidate a and history h_1..h_T (h_T the most recent):

    logit = bias + q_a + gamma * log(1 + sum_t recency^(T - t) * exp(beta * (v_a . v_h_t - 1)))
            + current * 1{category(a) is one of the user's interests at the impression}

The sum is a soft count of the behaviours most related to the candidate (exp(beta*(cos-1)) is ~1
for near-identical items and ~0 for unrelated ones), weighted towards recent ones: it depends on
the few related behaviours, not on the history average (so attention beats sum pooling). The
`current` term asks which of the history's categories the user still holds: with retargeted
candidates, past interests are in the history as often as current ones, so a set of behaviours
cannot tell them apart and their order can (so a model of interest evolution can beat
position-blind attention). `p_click` is stored, so the oracle AUC of the data is known.

By default a user has many more behaviours than labelled impressions (40 behaviours before the
first of 10 impressions), as in DIEN's public datasets, where each user gives one labelled target
and a long review history: most of what the data says about interests is in the behaviour
sequences, which DIEN's auxiliary loss supervises step by step (the paper, §5: the loss gains less
where many labelled instances train the embeddings).

Profile and context (off by default; the default world is the one above): with `profile` > 0
every user has a gender (2 values), an age bucket (7) and an occupation (21), and with `context`
> 0 every impression an hour (24) and a weekday (7), drawn uniformly from streams of their own
(so the rest of the world is unchanged). Each value f = v has a planted affinity A_f[v, c] ~ N(0, 1)
with every category c, and the logit gains

    + profile · Σ_f A_f[v_f(user), category(a)] / sqrt(3) + context · Σ_f A_f[v_f(impression), category(a)] / sqrt(2)

so that a model that reads these features with the candidate's category can beat one that does
not; p_click includes the terms (the oracle stays exact).

Train/test split by time: each user's last `test_per_user` impressions form the test set. With
`valid_users` > 0, as many more users of the same world (ids after the others) give a
validation set, their last `test_per_user` impressions in valid/: rows of no training or test
user, for choosing hyper-parameters without the test set.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from trainer.config import ConfigError
from trainer.metrics import auc


@dataclass(frozen=True)
class WorldSpec:
    users: int = 60000
    items: int = 5000
    cates: int = 100
    impressions_per_user: int = 10  # of which the last `test_per_user` go to the test set
    test_per_user: int = 2
    hist_max: int = 50  # behaviours kept per impression (most recent)
    min_hist: int = 40  # behaviours before the first impression: long histories, few labels
    latent_dim: int = 8
    interests: int = 3
    drift: float = 0.15
    explore: float = 0.1
    item_sigma: float = 0.18  # within-category cosine about 0.8
    zipf: float = 1.1
    quality_std: float = 0.5
    bias: float = -3.0
    gamma: float = 1.0
    beta: float = 6.0
    recency: float = 0.97
    current: float = 2.0  # + current x [the candidate's category is one of the user's interests now]
    from_history: float = 0.3  # share of candidates re-drawn from the category of a past behaviour
    valid_users: int = 0  # further users whose last impressions form valid/ (0: no validation set)
    profile: float = 0.0  # strength of the profile × category affinities (0: no profile columns)
    context: float = 0.0  # strength of the context × category affinities (0: no context columns)
    seed: int = 0


# the profile and context fields of the generator, and their number of values
PROFILE_FIELDS = {"gender": 2, "age": 7, "occupation": 21}
CONTEXT_FIELDS = {"hour": 24, "weekday": 7}


def _zipf_cdf(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return np.cumsum(w / w.sum())


class World:
    """Items, categories and click model; users are generated in chunks from it."""

    def __init__(self, spec: WorldSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        k = spec.latent_dim
        u = rng.standard_normal((spec.cates, k))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        # Items are grouped by category in blocks of (nearly) equal size, then ids are shuffled so
        # that an id says nothing about its category.
        self.item_cate_sorted = np.sort(np.arange(spec.items) % spec.cates)
        v = u[self.item_cate_sorted] + spec.item_sigma * rng.standard_normal((spec.items, k))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        perm = rng.permutation(spec.items)  # sorted position -> public item id
        self.item_id_of = perm
        self.item_cate = np.empty(spec.items, np.int64)
        self.item_cate[perm] = self.item_cate_sorted
        self.item_vec = np.empty_like(v, dtype=np.float32)
        self.item_vec[perm] = v
        self.item_quality = (spec.quality_std * rng.standard_normal(spec.items)).astype(np.float32)
        self.cate_start = np.searchsorted(self.item_cate_sorted, np.arange(spec.cates))
        self.cate_size = np.diff(np.append(self.cate_start, spec.items))
        self.zipf_cdf = _zipf_cdf(int(self.cate_size.max()), spec.zipf)
        # Global popularity: a Zipf rank over all items.
        self.global_cdf = _zipf_cdf(spec.items, spec.zipf)
        self.global_order = rng.permutation(spec.items)
        # Planted affinities of every profile and context value with every category (a stream of
        # their own: the world above does not change with the flags)
        rng_aff = np.random.default_rng([spec.seed, 4])
        fields = {**PROFILE_FIELDS, **CONTEXT_FIELDS}
        self.affinity = {f: rng_aff.standard_normal((n, spec.cates)) for f, n in fields.items()}

    def sample_in_cate(self, rng: np.random.Generator, cate: np.ndarray) -> np.ndarray:
        """One item of each given category, Zipf-popular within the category."""
        size = self.cate_size[cate]
        rank = np.searchsorted(self.zipf_cdf, rng.random(cate.shape))
        rank = np.minimum(rank, size - 1)  # truncated Zipf for the smaller categories
        return self.item_id_of[self.cate_start[cate] + rank]

    def sample_popular(self, rng: np.random.Generator, n: int) -> np.ndarray:
        rank = np.minimum(np.searchsorted(self.global_cdf, rng.random(n)), self.spec.items - 1)
        return self.global_order[rank]

    def users(self, first_user: int, n_users: int) -> dict[str, np.ndarray]:
        """All impressions of users [first_user, first_user + n_users), in time order per user."""
        s = self.spec
        rng = np.random.default_rng([s.seed, 1, first_user])
        n_imp = s.impressions_per_user
        steps = s.min_hist + n_imp  # one behaviour between consecutive impressions at least
        steps += n_imp  # and on average two
        # --- behaviour timelines [U, L] with drifting interests
        interests = rng.integers(0, s.cates, (n_users, s.interests))
        beh_cate = np.empty((n_users, steps), np.int64)
        cur_interests = np.empty((n_users, steps, s.interests), np.int64)
        rows = np.arange(n_users)
        for t in range(steps):
            drift = rng.random(n_users) < s.drift
            slot = rng.integers(0, s.interests, n_users)
            new = rng.integers(0, s.cates, n_users)
            interests[rows[drift], slot[drift]] = new[drift]
            cur_interests[:, t] = interests
            pick = interests[rows, rng.integers(0, s.interests, n_users)]
            explore = rng.random(n_users) < s.explore
            beh_cate[:, t] = np.where(explore, rng.integers(0, s.cates, n_users), pick)
        beh_item = self.sample_in_cate(rng, beh_cate.ravel()).reshape(n_users, steps)
        # --- impression times: n_imp distinct steps in [min_hist, steps), sorted
        cand_t = np.argsort(rng.random((n_users, steps - s.min_hist)), axis=1)[:, :n_imp]
        imp_t = np.sort(cand_t, axis=1) + s.min_hist  # [U, n_imp]: history = steps < t
        user = np.repeat(rows + first_user, n_imp)
        u_local = np.repeat(rows, n_imp)
        t_flat = imp_t.ravel()
        # --- candidates: from current interests (half) or global popularity
        n = t_flat.size
        from_interest = rng.random(n) < 0.5
        cur = cur_interests[u_local, t_flat - 1]  # interests at the time of the impression
        cate_pick = cur[np.arange(n), rng.integers(0, s.interests, n)]
        cand = np.where(from_interest, self.sample_in_cate(rng, cate_pick), self.sample_popular(rng, n))
        # --- histories (jagged): the last hist_max behaviours before t, oldest first
        lengths = np.minimum(t_flat, s.hist_max)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        start = t_flat - lengths
        flat = np.repeat(u_local * steps + start, lengths) + within
        hist_item = beh_item.ravel()[flat]
        if s.from_history:  # retargeting: an item of the category of one behaviour of the history
            again = (rng.random(n) < s.from_history) & (lengths > 0)
            pick = offsets[:-1] + np.minimum((rng.random(n) * lengths).astype(np.int64), lengths - 1)
            cand = np.where(again, self.sample_in_cate(rng, self.item_cate[hist_item[np.where(again, pick, 0)]]), cand)
        # --- click model
        age = np.repeat(lengths, lengths) - 1 - within  # 0 for the most recent behaviour
        cos = np.einsum("ij,ij->i", self.item_vec[hist_item], np.repeat(self.item_vec[cand], lengths, 0))
        kernel = s.recency**age * np.exp(s.beta * (cos - 1.0))
        soft_count = np.add.reduceat(kernel, offsets[:-1]) if n else kernel[:0]
        soft_count[lengths == 0] = 0.0
        logit = s.bias + self.item_quality[cand] + s.gamma * np.log1p(soft_count)
        if s.current:  # which of the history's categories are still interests: an order question
            logit += s.current * (cur == self.item_cate[cand][:, None]).any(axis=1)
        extra = {}
        rng_pc = np.random.default_rng([s.seed, 5, first_user])  # profile and context values
        for strength, fields, per_user in ((s.profile, PROFILE_FIELDS, True), (s.context, CONTEXT_FIELDS, False)):
            if not strength:
                continue
            term = np.zeros(n)
            for f, card in fields.items():
                v = rng_pc.integers(0, card, n_users)[u_local] if per_user else rng_pc.integers(0, card, n)
                term += self.affinity[f][v, self.item_cate[cand]]
                extra[f] = v.astype(np.int64)
            logit += strength * term / np.sqrt(len(fields))
        p = 1.0 / (1.0 + np.exp(-logit))
        label = (rng.random(n) < p).astype(np.int8)
        return {
            "label": label,
            "user_id": user.astype(np.int64),
            "item_id": cand.astype(np.int64),
            "cate_id": self.item_cate[cand],
            "hist_offsets": offsets,
            "hist_item_id": hist_item.astype(np.int64),
            "hist_cate_id": self.item_cate[hist_item],
            "ts": t_flat.astype(np.int64),
            "p_click": p.astype(np.float32),
            **extra,  # profile and context columns (with the flags)
            "interests": cur,  # [n, interests]: the user's interests at the impression (not written)
            "is_test": np.tile(np.arange(n_imp) >= n_imp - s.test_per_user, n_users),
        }


def _to_table(cols: dict[str, np.ndarray], idx: np.ndarray) -> pa.Table:
    """Arrow table of the rows `idx`; list columns are built from offsets, with no per-row Python."""
    off = cols["hist_offsets"]
    lengths = off[idx + 1] - off[idx]
    new_off = np.zeros(idx.size + 1, np.int64)
    np.cumsum(lengths, out=new_off[1:])
    within = np.arange(new_off[-1]) - np.repeat(new_off[:-1], lengths)
    gather = np.repeat(off[idx], lengths) + within
    offsets = pa.array(new_off.astype(np.int32))
    arrays = {
        "label": pa.array(cols["label"][idx]),
        "user_id": pa.array(cols["user_id"][idx]),
        "item_id": pa.array(cols["item_id"][idx]),
        "cate_id": pa.array(cols["cate_id"][idx]),
        "hist_item_id": pa.ListArray.from_arrays(offsets, pa.array(cols["hist_item_id"][gather])),
        "hist_cate_id": pa.ListArray.from_arrays(offsets, pa.array(cols["hist_cate_id"][gather])),
        "ts": pa.array(cols["ts"][idx]),
        "p_click": pa.array(cols["p_click"][idx]),
    }
    for f in (*PROFILE_FIELDS, *CONTEXT_FIELDS):
        if f in cols:
            arrays[f] = pa.array(cols[f][idx])
    return pa.table(arrays)


def generate(
    spec: WorldSpec,
    out: Path,
    train_files: int = 4,
    test_files: int = 2,
    row_group_size: int = 16384,
    user_chunk: int = 4096,
    progress: bool = True,
) -> dict:
    """Write out/train/part-*.parquet and out/test/part-*.parquet; return a summary dict."""
    out = Path(out)
    world = World(spec)
    rng = np.random.default_rng([spec.seed, 2])
    chunks = [(u, min(user_chunk, spec.users - u), ("train", "test")) for u in range(0, spec.users, user_chunk)]
    end = spec.users + spec.valid_users
    chunks += [(u, min(user_chunk, end - u), ("valid",)) for u in range(spec.users, end, user_chunk)]
    n_train = spec.users * (spec.impressions_per_user - spec.test_per_user)
    n_test = spec.users * spec.test_per_user
    n_valid = spec.valid_users * spec.test_per_user
    splits = ("train", "test", "valid") if spec.valid_users else ("train", "test")
    # Rows are spread over files by a seeded shuffle of whole chunks' rows, so every file is a
    # random sample of users and times.
    writers: dict[str, list[pq.ParquetWriter]] = {}
    counts = dict.fromkeys(splits, 0)
    positives = dict.fromkeys(splits, 0)
    t0 = time.perf_counter()
    for split in ("train", "test", "valid"):  # a valid/ of an earlier run goes too
        if split not in splits:
            shutil.rmtree(out / split, ignore_errors=True)
            continue
        (out / split).mkdir(parents=True, exist_ok=True)
        for old in (out / split).glob("part-*.parquet"):
            old.unlink()
        (out / split / "_SUCCESS").unlink(missing_ok=True)
    bar = tqdm(total=n_train + n_test + n_valid, unit="rows", disable=not progress, desc="generate")
    files = {"train": train_files, "test": test_files, "valid": test_files}
    try:
        for first, n_users, chunk_splits in chunks:
            cols = world.users(first, n_users)
            for split in chunk_splits:
                n_files = files[split]
                idx = np.flatnonzero(cols["is_test"] == (split != "train"))
                idx = idx[rng.permutation(idx.size)]
                for f, part in enumerate(np.array_split(idx, n_files)):
                    table = _to_table(cols, part)
                    ws = writers.setdefault(split, [])
                    if len(ws) <= f:
                        path = out / split / f"part-{f:03d}.parquet"
                        ws.append(pq.ParquetWriter(path, table.schema))
                    ws[f].write_table(table, row_group_size=row_group_size)
                counts[split] += idx.size
                positives[split] += int(cols["label"][idx].sum())
                bar.update(idx.size)
    finally:
        for ws in writers.values():
            for w in ws:
                w.close()
        bar.close()
    seconds = time.perf_counter() - t0
    summary = {
        "spec": asdict(spec),
        "rows": counts,
        "ctr": {k: positives[k] / max(counts[k], 1) for k in counts},
        "oracle_auc": {k: oracle_auc(out / k) for k in counts},
        "seconds": round(seconds, 2),
        "rows_per_minute": round((counts["train"] + counts["test"]) / seconds * 60),
    }
    (out / "generate.json").write_text(json.dumps(summary, indent=2))
    for split in counts:
        (out / split / "_SUCCESS").write_text("")
    return summary


def oracle_auc(split_dir: Path) -> float:
    t = pq.read_table(sorted(Path(split_dir).glob("*.parquet")), columns=["label", "p_click"])
    return auc(t["label"].to_numpy(), t["p_click"].to_numpy())


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = WorldSpec()
    p.add_argument("--out", default="data/synthetic", help="output directory (default: %(default)s)")
    meaning = {
        "valid_users": "further users of the same world whose last impressions form valid/ (a validation set)",
        "profile": "strength of the planted gender/age/occupation × category affinities (0: no profile columns)",
        "context": "strength of the planted hour/weekday × category affinities (0: no context columns)",
    }
    for name, value in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        text = f"{meaning[name]} " if name in meaning else ""
        p.add_argument(flag, type=type(value), default=value, help=f"{text}(default: {value})")
    p.add_argument("--train-files", type=int, default=4)
    p.add_argument("--test-files", type=int, default=2)
    p.add_argument("--row-group-size", type=int, default=16384)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> dict:
    spec = WorldSpec(**{k: getattr(args, k) for k in asdict(WorldSpec())})
    _validate(spec, args)
    return generate(
        spec,
        Path(args.out),
        train_files=args.train_files,
        test_files=args.test_files,
        row_group_size=args.row_group_size,
        progress=not args.no_progress,
    )


def _validate(spec: WorldSpec, args: argparse.Namespace) -> None:
    checks = [
        (spec.users > 0, "--users must be > 0"),
        (spec.valid_users >= 0, "--valid-users must be >= 0"),
        (spec.cates > 0 and spec.items >= spec.cates, "--items must be >= --cates > 0"),
        (0 < spec.test_per_user < spec.impressions_per_user, "need 0 < --test-per-user < --impressions-per-user"),
        (spec.hist_max > 0 and spec.min_hist >= 0, "--hist-max must be > 0, --min-hist >= 0"),
        (0 <= spec.drift <= 1 and 0 <= spec.explore <= 1, "--drift and --explore are probabilities"),
        (0 < spec.recency <= 1, "--recency must be in (0, 1]"),
        (spec.interests > 0 and spec.latent_dim > 0, "--interests and --latent-dim must be > 0"),
        (args.train_files > 0 and args.test_files > 0, "--train-files and --test-files must be > 0"),
        (args.row_group_size > 0, "--row-group-size must be > 0"),
        (math.isfinite(spec.gamma) and math.isfinite(spec.beta), "--gamma and --beta must be finite"),
        (spec.profile >= 0 and spec.context >= 0, "--profile and --context must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"generate: {msg}")
